//! `estafeta-bench compare`: smtp-sink (the ceiling), estafeta and a private Postfix instance
//! measured side by side with the same workload, rounds interleaved, then a table.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::deliver::{self, Counter, Delivered, LogCounter};
use crate::load;
use crate::report::{self, Latency, Round, Throughput, Workload};
use crate::servers::{self, Fleet, PostfixLayout, Proc};

/// Recipients cycle through user0..user15 (the bench's default `--mailboxes`).
const MAILBOXES: u64 = 16;

#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// The estafeta binary to measure (e.g. target/release/estafeta).
    #[arg(long, value_name = "PATH")]
    estafeta: PathBuf,

    /// Rounds; each measures smtp-sink, estafeta, then Postfix.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=1000))]
    rounds: u32,

    /// Messages per counted run.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1..))]
    messages: u64,

    /// Concurrent client sessions.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    sessions: u64,

    /// Message size in bytes.
    #[arg(long, default_value_t = 4096)]
    size: usize,

    /// Where the configurations, spools, Maildirs and logs go (its old contents of these names
    /// are removed at start).
    #[arg(
        long,
        default_value = "/tmp/estafeta-bench-compare",
        value_name = "DIR"
    )]
    workdir: PathBuf,

    /// Messages sent (and waited for) before each counted run; 0 = none.
    #[arg(long, default_value_t = 500)]
    warmup: u64,

    /// Relay to a second smtp-sink instead of delivering locally; relayed = `status=sent` lines
    /// in each server's log.
    #[arg(long)]
    relay: bool,

    /// Leave Postfix out.
    #[arg(long)]
    no_postfix: bool,

    /// Messages of the single-session latency run.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    latency_messages: u64,

    /// Message size of the latency run.
    #[arg(long, default_value_t = 1024)]
    latency_size: usize,

    /// How long to wait, after a run, for its accepted messages to be delivered (or relayed).
    #[arg(long, default_value = "120s", value_parser = crate::parse_duration)]
    deliver_timeout: Duration,

    /// Per-operation timeout of the client (connect, each write, each reply).
    #[arg(long, default_value = "30s", value_parser = crate::parse_duration)]
    timeout: Duration,

    /// The smtp-sink binary (Debian package postfix).
    #[arg(long, default_value = "/usr/sbin/smtp-sink", value_name = "PATH")]
    smtp_sink: PathBuf,

    /// The postfix command; its master must be /usr/lib/postfix/sbin/master.
    #[arg(long, default_value = "/usr/sbin/postfix", value_name = "PATH")]
    postfix: PathBuf,
}

const POSTFIX_MASTER: &str = "/usr/lib/postfix/sbin/master";

/// A server under measurement.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// None for smtp-sink (it stores nothing).
    counter: Option<Counter>,
}

/// One run of the load against a target.
struct RunOut {
    out: load::Outcome,
    delivered: Option<Delivered>,
    messages: u64,
}

impl RunOut {
    fn latency(&self) -> (f64, f64) {
        let mut lat = self.out.stats.latencies.clone();
        lat.sort_unstable();
        (
            crate::ms(load::percentile(&lat, 50.0)),
            crate::ms(load::percentile(&lat, 99.0)),
        )
    }

    fn accepted_per_s(&self) -> f64 {
        crate::rate(self.out.stats.accepted, self.out.elapsed)
    }

    fn throughput(&self) -> Throughput {
        let (p50_ms, p99_ms) = self.latency();
        let st = &self.out.stats;
        Throughput {
            per_s: match self.delivered {
                Some(d) => crate::rate(d.count, d.elapsed),
                None => self.accepted_per_s(),
            },
            p50_ms,
            p99_ms,
            complete: st.accepted == self.messages && self.delivered.is_none_or(|d| d.complete),
        }
    }

    fn latency_figures(&self) -> Latency {
        let (p50_ms, p99_ms) = self.latency();
        Latency { p50_ms, p99_ms }
    }

    /// One line about the run, plus its error samples.
    fn describe(&self, what: &str) -> String {
        let st = &self.out.stats;
        let (p50, p99) = self.latency();
        let mut s = format!(
            "{what}: {}/{} accepted in {:.2} s = {} msg/s ({} temp, {} perm, {} errors)",
            st.accepted,
            self.messages,
            self.out.elapsed.as_secs_f64(),
            report::thousands(self.accepted_per_s()),
            st.temp,
            st.perm,
            st.errors
        );
        if let Some(d) = self.delivered {
            s += &format!(
                ", done {} in {:.2} s = {} msg/s{}",
                d.count,
                d.elapsed.as_secs_f64(),
                report::thousands(crate::rate(d.count, d.elapsed)),
                if d.complete { "" } else { " (INCOMPLETE)" }
            );
        }
        s += &format!(", p50 {p50:.2} ms p99 {p99:.2} ms");
        for e in &st.error_samples {
            s += &format!("\n      error {e}");
        }
        s
    }
}

impl CompareArgs {
    fn rcpt(&self) -> String {
        let domain = if self.relay {
            servers::RELAY_DOMAIN
        } else {
            servers::LOCAL_DOMAIN
        };
        format!("user{{n}}@{domain}")
    }

    fn params(&self, addr: SocketAddr, sessions: u64, messages: u64, size: usize) -> load::Params {
        load::Params {
            addr,
            sessions: sessions as usize,
            messages,
            size,
            per_connection: 1,
            pipelining: true,
            helo: "bench.example".into(),
            from: "bench@example.test".into(),
            rcpt: self.rcpt(),
            mailboxes: MAILBOXES,
            timeout: self.timeout,
        }
    }

    /// Sends `messages` and, for a server, waits until they are delivered (or relayed).
    async fn send(&self, t: &mut Target, sessions: u64, messages: u64, size: usize) -> RunOut {
        let baseline = match &mut t.counter {
            Some(c) => c.count().await,
            None => 0,
        };
        let start = Instant::now();
        let out = load::run(self.params(t.addr, sessions, messages, size)).await;
        let delivered = match &mut t.counter {
            Some(c) => Some(
                deliver::wait(c, baseline, out.stats.accepted, start, self.deliver_timeout).await,
            ),
            None => None,
        };
        RunOut {
            out,
            delivered,
            messages,
        }
    }

    /// Warm-up, counted run, latency run against one target.
    async fn measure(&self, round: u32, t: &mut Target) -> (Throughput, Latency) {
        let label = format!("round {round} {:<9}", t.name);
        if self.warmup > 0 {
            let w = self.send(t, self.sessions, self.warmup, self.size).await;
            if !w.throughput().complete {
                println!("{}", w.describe(&format!("{label} warm-up")));
            }
        }
        let run = self.send(t, self.sessions, self.messages, self.size).await;
        println!("{}", run.describe(&format!("{label} load   ")));
        let lat = self
            .send(t, 1, self.latency_messages, self.latency_size)
            .await;
        println!("{}", lat.describe(&format!("{label} latency")));
        (run.throughput(), lat.latency_figures())
    }
}

/// Why Postfix is left out, or the uid/gid its virtual delivery agent writes as.
fn postfix_plan(a: &CompareArgs) -> Result<(u32, u32), String> {
    if a.no_postfix {
        return Err("--no-postfix".into());
    }
    if !a.postfix.is_file() || !Path::new(POSTFIX_MASTER).is_file() {
        return Err(format!(
            "Postfix is not installed ({} or {POSTFIX_MASTER} missing; Debian: apt-get install postfix)",
            a.postfix.display()
        ));
    }
    if !servers::is_root() {
        return Err("not root: a private Postfix instance needs root".into());
    }
    if servers::user_ids("postfix").is_none() {
        return Err("no user 'postfix' (Postfix's mail_owner)".into());
    }
    servers::user_ids("nobody").ok_or_else(|| "no user 'nobody' to own the Maildirs".into())
}

/// Removes what an earlier run left in the work directory (stopping its Postfix first).
fn clean_workdir(a: &CompareArgs) -> anyhow::Result<()> {
    let w = &a.workdir;
    fs::create_dir_all(w).with_context(|| format!("creating {}", w.display()))?;
    let old_conf = w.join("postfix/conf");
    if old_conf.join("main.cf").is_file() && a.postfix.is_file() && servers::is_root() {
        // Quietly: it is usually not running.
        let _ = servers::run_command(
            &mut servers::Postfix::command(&a.postfix, &old_conf, "stop"),
            &w.join("postfix-cmd.log"),
            servers::command_limit(),
        );
    }
    for d in ["estafeta-data", "postfix", "pfmail"] {
        let p = w.join(d);
        if p.exists() {
            fs::remove_dir_all(&p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    for f in [
        "estafeta.toml",
        "estafeta.log",
        "postfix.log",
        "postfix-cmd.log",
        "sink.log",
        "relay-sink.log",
    ] {
        let _ = fs::remove_file(w.join(f));
    }
    Ok(())
}

/// What went wrong with the private Postfix: its log, and the messages of `postfix check` run
/// on a pseudo-terminal (postfix writes them to stderr only when it is a terminal; with a bad
/// main.cf they go nowhere else).
fn postfix_trouble(postfix: &Path, layout: &PostfixLayout, what: &str) -> String {
    let mut s = format!(
        "{what} of the private instance in {} failed (--no-postfix leaves Postfix out)",
        layout.config_dir.display()
    );
    let log = servers::tail(&layout.log_file, 1500);
    if !log.is_empty() {
        s += &format!("\n{}:\n{log}", layout.log_file.display());
    }
    let quote = |p: &Path| format!("'{}'", p.to_string_lossy().replace('\'', "'\\''"));
    let diag = layout.workdir.join("postfix-check.log");
    let _ = fs::remove_file(&diag);
    let _ = servers::run_command(
        Command::new("script")
            .arg("-qec")
            .arg(format!(
                "{} -c {} check",
                quote(postfix),
                quote(&layout.config_dir)
            ))
            .arg("/dev/null"),
        &diag,
        servers::command_limit(),
    );
    let out = servers::tail(&diag, 1500);
    if !out.is_empty() {
        s += &format!("\npostfix check says:\n{out}");
    }
    s
}

fn sink_command(bin: &Path, port: u16) -> Command {
    let mut c = Command::new(bin);
    if servers::is_root() {
        c.args(["-u", "nobody"]);
    }
    c.arg("-c").arg(format!("127.0.0.1:{port}")).arg("1000");
    c
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn version_of(cmd: &mut Command) -> String {
    cmd.output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown version".into())
}

async fn start_sink(
    fleet: &mut Fleet,
    a: &CompareArgs,
    name: &'static str,
    log: &str,
) -> anyhow::Result<u16> {
    let port = servers::free_port()?;
    let log = a.workdir.join(log);
    let mut p = Proc::spawn(name, &mut sink_command(&a.smtp_sink, port), &log, true)?;
    let r = servers::wait_greeting(name, local(port), Some(&mut p), &log).await;
    fleet.procs.push(p);
    r.map(|()| port)
}

pub async fn run(a: CompareArgs) -> anyhow::Result<()> {
    if !a.estafeta.is_file() {
        bail!(
            "--estafeta {}: no such file (build it: cargo build --release -p estafeta)",
            a.estafeta.display()
        );
    }
    if !a.smtp_sink.is_file() {
        bail!(
            "{}: not found; smtp-sink comes with Postfix (Debian: apt-get install postfix)",
            a.smtp_sink.display()
        );
    }
    let root = servers::is_root();
    let plan = postfix_plan(&a);
    if let Err(why) = &plan {
        println!("note: Postfix left out: {why}");
    }
    clean_workdir(&a)?;
    let workdir = fs::canonicalize(&a.workdir)?;
    let mut fleet = Fleet::default();

    // The ceiling, and with --relay the relays' destination.
    let sink_port = start_sink(&mut fleet, &a, "smtp-sink", "sink.log").await?;
    let relay_port = if a.relay {
        Some(start_sink(&mut fleet, &a, "relay smtp-sink", "relay-sink.log").await?)
    } else {
        None
    };

    // estafeta.
    let est_port = servers::free_port()?;
    let est_data = workdir.join("estafeta-data");
    let est_conf = workdir.join("estafeta.toml");
    let est_log = workdir.join("estafeta.log");
    fs::write(
        &est_conf,
        servers::estafeta_config(&est_data, est_port, root, relay_port),
    )
    .with_context(|| format!("writing {}", est_conf.display()))?;
    servers::run_command(
        Command::new(&a.estafeta).arg("check-config").arg(&est_conf),
        &est_log,
        servers::command_limit(),
    )?;
    let mut serve = Command::new(&a.estafeta);
    serve
        .arg("serve")
        .arg("--config")
        .arg(&est_conf)
        .env_remove("JOURNAL_STREAM");
    if a.relay {
        // The mail log (its `status="sent"` lines) and problems.
        serve.env("RUST_LOG", "warn,estafeta::maillog=info");
    } else {
        serve.env_remove("RUST_LOG");
    }
    let mut p = Proc::spawn("estafeta", &mut serve, &est_log, false)?;
    let r = servers::wait_greeting("estafeta", local(est_port), Some(&mut p), &est_log).await;
    let est_pid = p.pid();
    fleet.procs.push(p);
    r?;
    let est_version = version_of(Command::new(&a.estafeta).arg("--version"));

    // Postfix.
    let mut postfix_addr = None;
    let mut pf_version = String::new();
    if let Ok(ids) = plan {
        let port = servers::free_port()?;
        let layout = PostfixLayout::new(&workdir, port, ids, relay_port);
        layout.write(MAILBOXES)?;
        let cmd_log = workdir.join("postfix-cmd.log");
        let limit = servers::command_limit();
        servers::run_command(
            &mut servers::Postfix::command(&a.postfix, &layout.config_dir, "check"),
            &cmd_log,
            limit,
        )
        .with_context(|| postfix_trouble(&a.postfix, &layout, "postfix check"))?;
        fleet.postfix = Some(servers::Postfix {
            postfix: a.postfix.clone(),
            config_dir: layout.config_dir.clone(),
            cmd_log: cmd_log.clone(),
            running: true,
        });
        servers::run_command(
            &mut servers::Postfix::command(&a.postfix, &layout.config_dir, "start"),
            &cmd_log,
            limit,
        )
        .with_context(|| postfix_trouble(&a.postfix, &layout, "postfix start"))?;
        servers::wait_greeting("Postfix", local(port), None, &layout.log_file).await?;
        postfix_addr = Some(local(port));
        let postconf = a.postfix.with_file_name("postconf");
        pf_version = version_of(
            Command::new(postconf)
                .arg("-c")
                .arg(&layout.config_dir)
                .args(["-h", "mail_version"]),
        );
    }

    // What counts as done.
    let (est_counter, pf_counter) = if a.relay {
        (
            Counter::Log(LogCounter::new(&est_log)),
            Counter::Log(LogCounter::new(&workdir.join("postfix.log"))),
        )
    } else {
        (
            Counter::Maildir(est_data.join("mail")),
            Counter::Maildir(workdir.join("pfmail")),
        )
    };
    let mut sink = Target {
        name: "smtp-sink",
        addr: local(sink_port),
        counter: None,
    };
    let mut est = Target {
        name: "estafeta",
        addr: local(est_port),
        counter: Some(est_counter),
    };
    let mut pf = postfix_addr.map(|addr| Target {
        name: "Postfix",
        addr,
        counter: Some(pf_counter),
    });

    println!(
        "estafeta-bench compare: {} rounds of {} messages of {} bytes, {} sessions, 1 msg/connection, pipelining; {} warm-up messages before each run; latency: 1 session, {} messages of {} bytes",
        a.rounds, a.messages, a.size, a.sessions, a.warmup, a.latency_messages, a.latency_size
    );
    println!(
        "  smtp-sink  {} ({}, stores nothing: the ceiling)",
        sink.addr,
        a.smtp_sink.display()
    );
    let done = if a.relay {
        "relayed = its log's status=\"sent\" lines"
    } else {
        "delivered = files in data_dir/mail/*/*/Maildir"
    };
    println!(
        "  estafeta   {} ({}, {est_version}, pid {est_pid}; {done})",
        est.addr,
        a.estafeta.display()
    );
    if let Some(pf) = &pf {
        let done = if a.relay {
            "relayed = status=sent lines in postfix.log"
        } else {
            "delivered = files in pfmail/localhost/*/Maildir"
        };
        println!(
            "  Postfix    {} (Postfix {pf_version}, private instance in {}/postfix; {done})",
            pf.addr,
            workdir.display()
        );
    }
    if let Some(port) = relay_port {
        println!("  relay      user{{n}}@remote.test to smtp-sink 127.0.0.1:{port}");
    }

    let mut rounds = Vec::new();
    for round in 1..=a.rounds {
        let (sink_t, sink_l) = a.measure(round, &mut sink).await;
        let (est_t, est_l) = a.measure(round, &mut est).await;
        let postfix = match &mut pf {
            Some(t) => Some(a.measure(round, t).await),
            None => None,
        };
        // A server that died shows in its figures; say so plainly too.
        for p in &mut fleet.procs {
            p.check_alive()?;
        }
        rounds.push(Round {
            sink: sink_t,
            estafeta: est_t,
            postfix: postfix.map(|p| p.0),
            sink_lat: sink_l,
            estafeta_lat: est_l,
            postfix_lat: postfix.map(|p| p.1),
        });
    }

    let what = if a.relay { "relayed" } else { "delivered" };
    println!();
    println!(
        "Throughput: {} × {} bytes, {} sessions; smtp-sink accepted msg/s, servers {what} msg/s with p50 / p99 end of DATA to reply under load",
        a.messages, a.size, a.sessions
    );
    println!();
    print!("{}", report::throughput_table(&rounds, a.relay));
    if rounds
        .iter()
        .any(|r| !r.estafeta.complete || r.postfix.is_some_and(|p| !p.complete))
    {
        println!(
            "* incomplete: some messages were rejected, failed, or not {what} within {:?}",
            a.deliver_timeout
        );
    }
    println!();
    println!(
        "Latency: 1 session, {} × {} bytes, end of DATA to reply",
        a.latency_messages, a.latency_size
    );
    println!();
    print!("{}", report::latency_table(&rounds));
    println!();
    let w = Workload {
        messages: a.messages,
        size: a.size,
        sessions: a.sessions,
        relay: a.relay,
    };
    for (i, r) in rounds.iter().enumerate() {
        println!("{}", report::result_line(&(i + 1).to_string(), &w, r));
    }
    println!(
        "{}",
        report::result_line("median", &w, &report::median_round(&rounds))
    );
    fleet.stop_all();
    Ok(())
}

/// Resolves on SIGINT, SIGTERM or SIGHUP, with the signal's name.
pub async fn interrupted() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let mut hup = signal(SignalKind::hangup()).ok();
    let recv = |s: &mut Option<tokio::signal::unix::Signal>| {
        let s = s.take();
        async move {
            match s {
                Some(mut s) => {
                    s.recv().await;
                }
                None => std::future::pending::<()>().await,
            }
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        () = recv(&mut term) => "SIGTERM",
        () = recv(&mut hup) => "SIGHUP",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(args: &[&str]) -> CompareArgs {
        match crate::Args::try_parse_from(args).unwrap().command {
            Some(crate::Cmd::Compare(c)) => c,
            None => panic!("no subcommand"),
        }
    }

    #[test]
    fn arguments() {
        let c = parse(&["b", "compare", "--estafeta", "/x/estafeta"]);
        assert_eq!(c.estafeta, PathBuf::from("/x/estafeta"));
        assert_eq!(
            (c.rounds, c.messages, c.sessions, c.size),
            (3, 5000, 16, 4096)
        );
        assert_eq!(c.workdir, PathBuf::from("/tmp/estafeta-bench-compare"));
        assert_eq!((c.warmup, c.relay, c.no_postfix), (500, false, false));
        assert_eq!((c.latency_messages, c.latency_size), (1000, 1024));
        assert_eq!(c.rcpt(), "user{n}@localhost");

        let c = parse(&[
            "b",
            "compare",
            "--estafeta",
            "e",
            "--rounds",
            "1",
            "--messages",
            "1000",
            "--relay",
            "--no-postfix",
            "--workdir",
            "/dev/shm/w",
            "--deliver-timeout",
            "5s",
        ]);
        assert_eq!(
            (c.rounds, c.messages, c.relay, c.no_postfix),
            (1, 1000, true, true)
        );
        assert_eq!(c.deliver_timeout, Duration::from_secs(5));
        assert_eq!(c.rcpt(), "user{n}@remote.test");
        assert_eq!(postfix_plan(&c), Err("--no-postfix".to_string()));

        // --estafeta is required; load-mode options do not mix with the subcommand.
        assert!(crate::Args::try_parse_from(["b", "compare"]).is_err());
        assert!(
            crate::Args::try_parse_from(["b", "compare", "--estafeta", "e", "--rounds", "0"])
                .is_err()
        );
        assert!(
            crate::Args::try_parse_from(["b", "--addr", "h:1", "compare", "--estafeta", "e"])
                .is_err()
        );
        // Without the subcommand, load mode as before.
        assert!(
            crate::Args::try_parse_from(["b", "--messages", "10"])
                .unwrap()
                .command
                .is_none()
        );
    }
}
