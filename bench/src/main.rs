//! estafeta-bench: an SMTP load generator and benchmark. Works against any SMTP server; prints
//! figures (a human-readable block and one `RESULT key=value ...` line).

mod compare;
mod deliver;
mod idle;
mod load;
mod message;
mod probe;
mod report;
mod servers;
mod smtp;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "SMTP load generator and benchmark (works against any SMTP server)",
    args_conflicts_with_subcommands = true
)]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,

    /// Server address (host:port).
    #[arg(long, default_value = "127.0.0.1:2525")]
    addr: String,

    /// Concurrent client sessions.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    sessions: u64,

    /// Total messages to send.
    #[arg(long, default_value_t = 2000)]
    messages: u64,

    /// Message size in bytes (headers + body, CRLF lines, before dot-stuffing).
    #[arg(long, default_value_t = 4096)]
    size: usize,

    /// Messages per connection (1 = a new connection for every message).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    per_connection: u64,

    /// Pipeline MAIL, RCPT and DATA when the server offers PIPELINING (the default).
    #[arg(long, overrides_with = "no_pipelining")]
    pipelining: bool,

    /// Send MAIL, RCPT and DATA one by one, waiting for each reply.
    #[arg(long, overrides_with = "pipelining")]
    no_pipelining: bool,

    /// Name given in EHLO.
    #[arg(long, default_value = "bench.example")]
    helo: String,

    /// Envelope sender.
    #[arg(long, default_value = "bench@example.test")]
    from: String,

    /// Envelope recipient; `{n}` is replaced by the message number modulo --mailboxes.
    #[arg(long, default_value = "user{n}@localhost")]
    rcpt: String,

    /// Number of distinct recipients `{n}` cycles through.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    mailboxes: u64,

    /// Count delivered messages in DIR/*/*/Maildir/{new,cur} (and DIR/*/Maildir/{new,cur}).
    #[arg(long, value_name = "DIR")]
    maildir_root: Option<PathBuf>,

    /// How long to wait, after sending, for all accepted messages to appear in the Maildirs.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    deliver_timeout: Duration,

    /// Server process id, to report its peak and current RSS.
    #[arg(long)]
    pid: Option<u32>,

    /// Idle mode: open N connections, hold them idle, report greeting time and memory.
    #[arg(long, value_name = "N")]
    idle: Option<usize>,

    /// Idle mode: connection attempts in flight at once.
    #[arg(long, default_value_t = 256)]
    connect_parallel: usize,

    /// Per-operation timeout (connect, each write, each reply); also bounds each idle-mode phase.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Side by side: smtp-sink (the ceiling), estafeta and a private Postfix instance, same
    /// workload, rounds interleaved; prints a table and RESULT lines.
    Compare(compare::CompareArgs),
}

/// `500ms`, `30s`, `2m`, or a plain number of seconds (fractions allowed).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = if let Some(n) = s.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (use e.g. 500ms, 30s, 2m)"))?;
    Duration::try_from_secs_f64(v * unit).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    let nofile = probe::raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    if let Some(Cmd::Compare(c)) = args.command.take() {
        // Interrupted: the comparison's future is dropped, which stops every server it started.
        return rt.block_on(async {
            tokio::select! {
                r = compare::run(c) => r,
                sig = compare::interrupted() => bail!("interrupted by {sig}; servers stopped"),
            }
        });
    }
    rt.block_on(async {
        let addr = resolve(&args.addr).await?;
        match args.idle {
            Some(n) => run_idle(&args, addr, n, nofile).await,
            None => run_load(&args, addr).await,
        }
    })
}

async fn resolve(addr: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(addr)
        .await
        .with_context(|| format!("resolving {addr}"))?
        .next()
        .with_context(|| format!("no address for {addr}"))
}

fn ms(nanos: u64) -> f64 {
    nanos as f64 / 1e6
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn rate(n: u64, d: Duration) -> f64 {
    if d.is_zero() {
        0.0
    } else {
        n as f64 / d.as_secs_f64()
    }
}

async fn run_load(args: &Args, addr: SocketAddr) -> anyhow::Result<()> {
    let pipelining = !args.no_pipelining;
    let mut counter = args.maildir_root.clone().map(deliver::Counter::Maildir);
    let baseline = match &mut counter {
        Some(c) => Some(c.count().await),
        None => None,
    };
    let start = Instant::now();
    let out = load::run(load::Params {
        addr,
        sessions: args.sessions as usize,
        messages: args.messages,
        size: args.size,
        per_connection: args.per_connection,
        pipelining,
        helo: args.helo.clone(),
        from: args.from.clone(),
        rcpt: args.rcpt.clone(),
        mailboxes: args.mailboxes,
        timeout: args.timeout,
    })
    .await;
    let st = &out.stats;

    let delivered = match (&mut counter, baseline) {
        (Some(c), Some(base)) => {
            let d = deliver::wait(c, base, st.accepted, start, args.deliver_timeout).await;
            Some((d.count, d.elapsed, d.complete))
        }
        _ => None,
    };
    let mem = args.pid.and_then(probe::mem);

    let mut lat = st.latencies.clone();
    lat.sort_unstable();
    let (p50, p90, p99) = (
        load::percentile(&lat, 50.0),
        load::percentile(&lat, 90.0),
        load::percentile(&lat, 99.0),
    );
    let max = lat.last().copied().unwrap_or(0);
    let accepted_per_s = rate(st.accepted, out.elapsed);

    println!(
        "estafeta-bench: {} messages of {} bytes, {} sessions, {} msg/connection, pipelining {}{} -> {}",
        args.messages,
        out.message_size,
        args.sessions,
        args.per_connection,
        if pipelining { "on" } else { "off" },
        if pipelining && st.pipelining_unavailable {
            " (not offered by the server: not used)"
        } else {
            ""
        },
        addr
    );
    println!(
        "accepted   {} ({} temp, {} perm, {} errors) in {:.2} s = {:.1} msg/s, {} connections",
        st.accepted,
        st.temp,
        st.perm,
        st.errors,
        out.elapsed.as_secs_f64(),
        accepted_per_s,
        st.connections
    );
    for e in &st.error_samples {
        println!("error      {e}");
    }
    println!(
        "latency    p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  (end of DATA to reply)",
        ms(p50),
        ms(p90),
        ms(p99),
        ms(max)
    );
    if let Some((n, t, complete)) = delivered {
        println!(
            "delivered  {} in {:.2} s = {:.1} msg/s{}",
            n,
            t.as_secs_f64(),
            rate(n, t),
            if complete {
                String::new()
            } else {
                format!(
                    " (incomplete: {} accepted, gave up after {:?})",
                    st.accepted, args.deliver_timeout
                )
            }
        );
    }
    match (args.pid, mem) {
        (Some(_), Some(m)) => println!(
            "server     peak RSS {:.1} MiB, RSS {:.1} MiB",
            mib(m.peak_kib),
            mib(m.rss_kib)
        ),
        (Some(pid), None) => println!("server     no memory figures for pid {pid}"),
        _ => {}
    }

    let mut r = format!(
        "RESULT messages={} size={} sessions={} per_connection={} pipelining={} accepted={} temp={} perm={} errors={} connections={} elapsed_s={:.3} accepted_per_s={:.1} p50_ms={:.2} p90_ms={:.2} p99_ms={:.2} max_ms={:.2}",
        args.messages,
        out.message_size,
        args.sessions,
        args.per_connection,
        u8::from(pipelining && !st.pipelining_unavailable),
        st.accepted,
        st.temp,
        st.perm,
        st.errors,
        st.connections,
        out.elapsed.as_secs_f64(),
        accepted_per_s,
        ms(p50),
        ms(p90),
        ms(p99),
        ms(max)
    );
    if let Some((n, t, _)) = delivered {
        r += &format!(
            " delivered={n} delivered_s={:.3} delivered_per_s={:.1}",
            t.as_secs_f64(),
            rate(n, t)
        );
    }
    if let Some(m) = mem {
        r += &format!(" peak_rss_kib={} rss_kib={}", m.peak_kib, m.rss_kib);
    }
    println!("{r}");
    Ok(())
}

async fn run_idle(
    args: &Args,
    addr: SocketAddr,
    n: usize,
    nofile: libc::rlim_t,
) -> anyhow::Result<()> {
    if n == 0 {
        bail!("--idle needs at least one connection");
    }
    if (n as libc::rlim_t) + 64 > nofile {
        eprintln!(
            "estafeta-bench: warning: open file limit is {nofile}, {n} connections may not fit"
        );
    }
    let before = args.pid.and_then(probe::mem);
    let params = idle::Params {
        addr,
        connections: n,
        in_flight: args.connect_parallel,
        timeout: args.timeout,
    };
    let out = idle::open_all(&params).await;
    let greeted = out.greeted.len();
    // Let the server settle (finish writing greetings, free transient buffers) before measuring.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let after = args.pid.and_then(probe::mem);
    let (quit_ok, quit_time) =
        idle::quit_all(out.greeted, args.connect_parallel, args.timeout).await;

    println!(
        "estafeta-bench: {n} idle connections, {} connects in flight -> {addr}",
        args.connect_parallel
    );
    println!(
        "greeted    {greeted} of {n} with 220 in {:.3} s ({} other greeting, {} errors, {} not greeted within {:?})",
        out.greet_time.as_secs_f64(),
        out.refused,
        out.errors,
        out.timed_out,
        args.timeout
    );
    for e in &out.error_samples {
        println!("error      {e}");
    }
    let per_conn = match (before, after) {
        (Some(b), Some(a)) if greeted > 0 => {
            let per = (a.rss_kib as f64 - b.rss_kib as f64) * 1024.0 / greeted as f64;
            println!(
                "server     RSS {:.1} MiB before, {:.1} MiB with {greeted} idle connections = {:.0} bytes ({:.1} KiB) per connection; peak RSS {:.1} MiB",
                mib(b.rss_kib),
                mib(a.rss_kib),
                per,
                per / 1024.0,
                mib(a.peak_kib)
            );
            Some(per)
        }
        _ => {
            if let Some(pid) = args.pid {
                println!("server     no memory figures for pid {pid}");
            }
            None
        }
    };
    println!(
        "quit       {quit_ok} of {greeted} answered 221 in {:.3} s",
        quit_time.as_secs_f64()
    );
    let mut r = format!(
        "RESULT idle={n} greeted={greeted} refused={} errors={} timed_out={} greet_s={:.3} quit_ok={quit_ok}",
        out.refused,
        out.errors,
        out.timed_out,
        out.greet_time.as_secs_f64()
    );
    if let (Some(b), Some(a)) = (before, after) {
        r += &format!(
            " rss_before_kib={} rss_after_kib={} peak_rss_kib={}",
            b.rss_kib, a.rss_kib, a.peak_kib
        );
    }
    if let Some(per) = per_conn {
        r += &format!(" rss_per_conn_bytes={per:.0}");
    }
    println!("{r}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("-1s").is_err());
    }

    #[test]
    fn pipelining_flags() {
        let a = Args::parse_from(["b"]);
        assert!(!a.no_pipelining);
        let a = Args::parse_from(["b", "--no-pipelining"]);
        assert!(a.no_pipelining);
        let a = Args::parse_from(["b", "--no-pipelining", "--pipelining"]);
        assert!(!a.no_pipelining);
    }
}
