//! `estafeta queue list|show|summary|flush|hold|release|delete|bounce`: look at the queue and act
//! on it, the way Postfix's `mailq`/`postqueue`/`postsuper` do.
//!
//! Listing reads the spool directory and changes nothing, so it is the same whether the server
//! runs or not. Actions go to the running server through the control socket
//! ([`crate::control`]), which carries them out at once; when no server answers there, they
//! edit the spool directly, in the way the next start picks up.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;
use estafeta_config::Config;
use estafeta_queue::{
    AdminAction, AdminReport, QueueId, QueuedMessage, RcptState, Selection, Spool, Syncer,
};

use crate::control::{self, Sent};

/// The `queue` subcommands.
#[derive(Subcommand, Debug)]
pub enum QueueCommand {
    /// List the queued messages like mailq: ID, size, arrival, sender, then each pending
    /// recipient with its last error, and the next attempt. `!` after the ID: held.
    List,
    /// Show one message: envelope, each recipient's state, attempts and last error, next
    /// attempt, then the message's headers.
    Show {
        /// The queue ID.
        id: String,
    },
    /// Count the deferred recipients by destination domain and by reason.
    Summary,
    /// Attempt deferred messages now: all of them, the IDs given, or those with a pending
    /// recipient in one domain. Held messages are left alone.
    Flush {
        /// Queue IDs (none: every message).
        #[arg(conflicts_with = "domain")]
        ids: Vec<String>,
        /// Only messages with a pending recipient in this domain.
        #[arg(long, value_name = "DOMAIN")]
        domain: Option<String>,
    },
    /// Hold messages: never attempted until released (kept across restarts).
    Hold {
        /// Queue IDs.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Release held messages: attempted at once.
    Release {
        /// Queue IDs.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Delete messages from the queue, without notifying anyone.
    Delete {
        /// Queue IDs.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Return messages to their senders: every pending recipient fails (5.0.0) and the
    /// sender gets the usual failure notification.
    Bounce {
        /// Queue IDs.
        #[arg(required = true)]
        ids: Vec<String>,
    },
}

/// sysexits.h EX_USAGE is 64, but clap's usage errors exit 2: keep one code for both.
const EXIT_USAGE: u8 = 2;

/// Runs a `queue` subcommand. Exit 0 when done, 1 when an ID was not in the queue or on an
/// error, 2 on a usage error.
pub fn run(command: QueueCommand, cfg: &Config, json: bool) -> ExitCode {
    let spool_dir = cfg.data_dir.join("queue");
    let result = match command {
        QueueCommand::List => with_spool(&spool_dir, cfg, |s| list(s, json)),
        QueueCommand::Summary => with_spool(&spool_dir, cfg, |s| summary(s, json)),
        QueueCommand::Show { id } => match QueueId::parse(&id) {
            None => return usage(&format!("{id}: not a queue ID (12 hexadecimal digits)")),
            Some(id) => with_spool(&spool_dir, cfg, |s| show(s, id, json)),
        },
        QueueCommand::Flush { ids, domain } => {
            let sel = match (domain, ids.is_empty()) {
                (Some(d), _) => Selection::Domain(d),
                (None, true) => Selection::All,
                (None, false) => match parse_ids(&ids) {
                    Ok(v) => Selection::Ids(v),
                    Err(e) => return usage(&e),
                },
            };
            act(cfg, AdminAction::Flush(sel), json)
        }
        QueueCommand::Hold { ids } => act_on_ids(cfg, &ids, AdminAction::Hold, json),
        QueueCommand::Release { ids } => act_on_ids(cfg, &ids, AdminAction::Release, json),
        QueueCommand::Delete { ids } => act_on_ids(cfg, &ids, AdminAction::Delete, json),
        QueueCommand::Bounce { ids } => act_on_ids(cfg, &ids, AdminAction::Bounce, json),
    };
    match result {
        Ok(code) => code,
        Err(message) => {
            eprintln!("estafeta queue: {message}");
            ExitCode::FAILURE
        }
    }
}

fn usage(message: &str) -> ExitCode {
    eprintln!("estafeta queue: {message}");
    ExitCode::from(EXIT_USAGE)
}

fn parse_ids(ids: &[String]) -> Result<Vec<QueueId>, String> {
    ids.iter()
        .map(|s| {
            QueueId::parse(s).ok_or_else(|| format!("{s}: not a queue ID (12 hexadecimal digits)"))
        })
        .collect()
}

fn act_on_ids(
    cfg: &Config,
    ids: &[String],
    make: fn(Vec<QueueId>) -> AdminAction,
    json: bool,
) -> Result<ExitCode, String> {
    match parse_ids(ids) {
        Ok(v) => act(cfg, make(v), json),
        Err(e) => Ok(usage(&e)),
    }
}

fn io_err(what: &str) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

/// Opens the spool read-only; a missing spool directory is an empty queue.
fn with_spool(
    dir: &Path,
    cfg: &Config,
    f: impl FnOnce(Option<&Spool>) -> Result<ExitCode, String>,
) -> Result<ExitCode, String> {
    // `exists()` would say "no" for a spool this user may not enter, and the listing would
    // claim an empty queue: only a spool that is really not there is one.
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return f(None),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(format!(
                "cannot read the queue in {}: {e}: run this as root or as the server's user",
                dir.display()
            ));
        }
        Err(e) => return Err(format!("{}: {e}", dir.display())),
        Ok(_) => {}
    }
    let syncer = Syncer::start().map_err(io_err("cannot start the sync thread"))?;
    let spool = Spool::open_existing(dir, &cfg.hostname, syncer)
        .map_err(io_err(&dir.display().to_string()))?;
    f(Some(&spool))
}

fn scan(spool: Option<&Spool>) -> Result<Vec<QueuedMessage>, String> {
    let Some(spool) = spool else {
        return Ok(Vec::new());
    };
    let (list, broken) = spool
        .scan()
        .map_err(io_err(&spool.dir().display().to_string()))?;
    for (name, e) in broken {
        eprintln!("estafeta queue: {name}: cannot read: {e}");
    }
    Ok(list)
}

/// Carries out an action: through the running server, or on the spool when none runs.
fn act(cfg: &Config, action: AdminAction, json: bool) -> Result<ExitCode, String> {
    let (report, online) = match control::send(&cfg.control.socket, &action)? {
        Sent::Done(r) => (r, true),
        Sent::NoServer => (offline(cfg, &action)?, false),
    };
    let verb = match &action {
        AdminAction::Flush(_) => "flushed",
        AdminAction::Hold(_) => "held",
        AdminAction::Release(_) => "released",
        AdminAction::Delete(_) => "deleted",
        AdminAction::Bounce(_) => "bounced",
    };
    if json {
        let ids = |v: &[QueueId]| v.iter().map(|i| i.to_string()).collect::<Vec<_>>();
        let out = serde_json::json!({
            "action": verb,
            "server_running": online,
            "done": ids(&report.done),
            "skipped": ids(&report.skipped),
            "unknown": ids(&report.unknown),
        });
        println!("{out}");
    } else {
        print_report(verb, online, &action, &report);
    }
    Ok(if report.unknown.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_report(verb: &str, online: bool, action: &AdminAction, report: &AdminReport) {
    let when = match (online, action) {
        (true, _) => "",
        (false, AdminAction::Flush(_)) | (false, AdminAction::Release(_)) => {
            " (server not running: attempted at its next start)"
        }
        (false, AdminAction::Bounce(_)) => {
            " (server not running: the notification is sent at its next start)"
        }
        (false, _) => " (server not running: spool edited)",
    };
    for id in &report.done {
        println!("{id}: {verb}{when}");
    }
    for id in &report.skipped {
        println!("{id}: held, not flushed (release it first)");
    }
    for id in &report.unknown {
        eprintln!("estafeta queue: {id}: no such message in the queue");
    }
    if let AdminAction::Flush(sel) = action
        && report.done.is_empty()
        && report.skipped.is_empty()
        && report.unknown.is_empty()
    {
        match sel {
            Selection::Domain(d) => println!("nothing queued for {d}"),
            _ => println!("nothing to flush"),
        }
    }
}

fn offline(cfg: &Config, action: &AdminAction) -> Result<AdminReport, String> {
    let dir = cfg.data_dir.join("queue");
    if !dir.exists() {
        let unknown = match action {
            AdminAction::Flush(Selection::Ids(v))
            | AdminAction::Hold(v)
            | AdminAction::Release(v)
            | AdminAction::Delete(v)
            | AdminAction::Bounce(v) => v.clone(),
            AdminAction::Flush(_) => Vec::new(),
        };
        return Ok(AdminReport {
            unknown,
            ..AdminReport::default()
        });
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_err("cannot start the runtime"))?;
    let syncer = Syncer::start().map_err(io_err("cannot start the sync thread"))?;
    let spool = Spool::open_existing(&dir, &cfg.hostname, syncer)
        .map_err(io_err(&dir.display().to_string()))?;
    let sched = crate::scheduler_config(cfg);
    runtime
        .block_on(estafeta_queue::apply_offline(
            &spool,
            &sched,
            action.clone(),
        ))
        .map_err(io_err(&dir.display().to_string()))
}

// ---- listing -----------------------------------------------------------------------------------

/// `2026-11-23 13:14:24` (UTC) from Unix seconds.
pub fn utc(secs: u64) -> String {
    estafeta_proto::trace::utc_timestamp(secs)
}

fn sender(m: &QueuedMessage) -> String {
    let s = m.envelope.from.to_string();
    if s.is_empty() {
        "MAILER-DAEMON".into()
    } else {
        s
    }
}

fn next_attempt(m: &QueuedMessage) -> String {
    if m.held {
        "held".into()
    } else if m.next_attempt == 0 || m.next_attempt <= estafeta_queue::unix_now() {
        "now".into()
    } else {
        format!("{} UTC", utc(m.next_attempt))
    }
}

fn state_str(s: RcptState) -> &'static str {
    match s {
        RcptState::Pending => "pending",
        RcptState::Delivered => "delivered",
        RcptState::Failed => "failed",
    }
}

fn message_json(m: &QueuedMessage, all_recipients: bool) -> serde_json::Value {
    let rcpts: Vec<serde_json::Value> = m
        .envelope
        .rcpts
        .iter()
        .zip(&m.status)
        .filter(|(_, s)| all_recipients || s.state == RcptState::Pending)
        .map(|(r, s)| {
            let mut v = serde_json::json!({
                "address": r.path.to_string(),
                "state": state_str(s.state),
                "attempts": s.attempts,
                "last_error": s.last_error,
            });
            if all_recipients {
                v["notify"] = r.params.notify.map(|n| n.to_wire()).into();
                v["orcpt"] = r
                    .params
                    .orcpt
                    .as_ref()
                    .map(|o| format!("{};{}", o.addr_type, o.xtext))
                    .into();
            }
            v
        })
        .collect();
    serde_json::json!({
        "id": m.id.to_string(),
        "size": m.size,
        "arrival": m.arrival,
        "arrival_utc": utc(m.arrival),
        "sender": m.envelope.from.to_string(),
        "held": m.held,
        "next_attempt": m.next_attempt,
        "next_attempt_utc": (m.next_attempt > 0).then(|| utc(m.next_attempt)),
        "recipients": rcpts,
    })
}

/// The column where recipients start in `list`, as in mailq.
const INDENT: usize = 44;

fn list(spool: Option<&Spool>, json: bool) -> Result<ExitCode, String> {
    let messages = scan(spool)?;
    if json {
        let all: Vec<_> = messages.iter().map(|m| message_json(m, false)).collect();
        println!("{}", serde_json::Value::Array(all));
        return Ok(ExitCode::SUCCESS);
    }
    if messages.is_empty() {
        println!("Mail queue is empty");
        return Ok(ExitCode::SUCCESS);
    }
    println!("-Queue ID-    --Size-- ----Arrival Time---  -Sender/Recipient-------");
    let pad = " ".repeat(INDENT);
    let mut total = 0u64;
    for m in &messages {
        total += m.size;
        let mark = if m.held { "!" } else { " " };
        println!(
            "{}{mark} {:>8} {}  {}",
            m.id,
            m.size,
            utc(m.arrival),
            sender(m)
        );
        println!("{pad}(next attempt: {})", next_attempt(m));
        for i in m.pending() {
            if let Some(e) = &m.status[i].last_error {
                println!("{pad}({e})");
            }
            println!("{pad}{}", m.envelope.rcpts[i].path);
        }
        println!();
    }
    let n = messages.len();
    println!(
        "-- {} Kbytes in {n} Request{}.",
        total.div_ceil(1024),
        if n == 1 { "" } else { "s" }
    );
    Ok(ExitCode::SUCCESS)
}

fn show(spool: Option<&Spool>, id: QueueId, json: bool) -> Result<ExitCode, String> {
    let found = spool.map(|s| s.load(id));
    let (spool, m) = match (spool, found) {
        (Some(s), Some(Ok(m))) => (s, m),
        (_, Some(Err(e))) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(format!("{id}: {e}"));
        }
        _ => {
            eprintln!("estafeta queue: {id}: no such message in the queue");
            return Ok(ExitCode::FAILURE);
        }
    };
    let headers = spool
        .read_headers(id)
        .map(|h| String::from_utf8_lossy(&h).into_owned())
        .map_err(io_err(&id.to_string()))?;
    let env = &m.envelope;
    if json {
        let mut v = message_json(&m, true);
        v["client"] = serde_json::json!({
            "ip": env.client.ip.to_string(),
            "port": env.client.port,
            "helo": env.client.helo,
            "protocol": env.client.protocol,
            "tls": env.client.tls,
            "auth": env.client.auth,
            "local_uid": env.client.local_uid,
        });
        v["params"] = serde_json::json!({
            "size": env.params.size,
            "body": env.params.body.map(|b| b.as_str()),
            "smtputf8": env.params.smtputf8,
            "ret": env.params.ret.map(|r| r.as_str()),
            "envid": env.params.envid,
            "requiretls": env.params.requiretls,
        });
        v["headers"] = headers.into();
        println!("{v}");
        return Ok(ExitCode::SUCCESS);
    }
    println!("id:           {}", m.id);
    println!("arrival:      {} UTC", utc(m.arrival));
    println!("size:         {}", m.size);
    let mut params = Vec::new();
    if let Some(s) = env.params.size {
        params.push(format!("SIZE={s}"));
    }
    if let Some(b) = env.params.body {
        params.push(format!("BODY={}", b.as_str()));
    }
    if env.params.smtputf8 {
        params.push("SMTPUTF8".into());
    }
    if let Some(r) = env.params.ret {
        params.push(format!("RET={}", r.as_str()));
    }
    if let Some(e) = &env.params.envid {
        params.push(format!("ENVID={e}"));
    }
    if env.params.requiretls {
        params.push("REQUIRETLS".into());
    }
    println!("sender:       <{}> {}", env.from, params.join(" "));
    let mut client = format!(
        "{} [{}]:{} {}",
        env.client.helo, env.client.ip, env.client.port, env.client.protocol
    );
    if let Some(t) = &env.client.tls {
        client.push_str(&format!(" tls={t}"));
    }
    if let Some(a) = &env.client.auth {
        client.push_str(&format!(" auth={a}"));
    }
    if let Some(uid) = env.client.local_uid {
        client.push_str(&format!(" local uid={uid}"));
    }
    println!("client:       {client}");
    println!("held:         {}", if m.held { "yes" } else { "no" });
    println!("next attempt: {}", next_attempt(&m));
    for (r, s) in env.rcpts.iter().zip(&m.status) {
        let mut extra = String::new();
        if let Some(n) = r.params.notify {
            extra.push_str(&format!(" NOTIFY={}", n.to_wire()));
        }
        if let Some(o) = &r.params.orcpt {
            extra.push_str(&format!(" ORCPT={};{}", o.addr_type, o.xtext));
        }
        println!(
            "recipient:    <{}> {}, {} attempt(s){extra}",
            r.path,
            state_str(s.state),
            s.attempts
        );
        if let Some(e) = &s.last_error {
            println!("              last error: {e}");
        }
    }
    println!();
    print!("{}", headers.replace("\r\n", "\n"));
    Ok(ExitCode::SUCCESS)
}

/// The reason a recipient waits, made comparable across hosts: the reply without the
/// "host said:" prefix and the "(in reply to …)" suffix, on one line.
pub fn reason(last_error: Option<&str>) -> String {
    let Some(e) = last_error else {
        return "not attempted yet".into();
    };
    let mut r = e.trim();
    if let Some((_, rest)) = r.split_once(" said: ") {
        r = rest;
    }
    if let Some(pos) = r.rfind(" (in reply to ") {
        r = &r[..pos];
    }
    r.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn summary(spool: Option<&Spool>, json: bool) -> Result<ExitCode, String> {
    let messages = scan(spool)?;
    let mut by_domain: BTreeMap<String, usize> = BTreeMap::new();
    let mut by_reason: BTreeMap<String, usize> = BTreeMap::new();
    let mut held = 0;
    let mut deferred = 0;
    for m in &messages {
        if m.held {
            held += 1;
        }
        for i in m.pending() {
            deferred += 1;
            let domain = m.envelope.rcpts[i].path.mailbox.domain.key();
            *by_domain.entry(domain).or_default() += 1;
            let why = if m.held {
                "held by the administrator".to_string()
            } else {
                reason(m.status[i].last_error.as_deref())
            };
            *by_reason.entry(why).or_default() += 1;
        }
    }
    let sorted = |map: BTreeMap<String, usize>| {
        let mut v: Vec<(String, usize)> = map.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        v
    };
    let (by_domain, by_reason) = (sorted(by_domain), sorted(by_reason));
    if json {
        let rows = |key: &str, v: &[(String, usize)]| -> Vec<serde_json::Value> {
            v.iter()
                .map(|(k, n)| serde_json::json!({ key: k, "count": n }))
                .collect()
        };
        let out = serde_json::json!({
            "messages": messages.len(),
            "held_messages": held,
            "deferred_recipients": deferred,
            "by_domain": rows("domain", &by_domain),
            "by_reason": rows("reason", &by_reason),
        });
        println!("{out}");
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{} message(s) queued, {held} held; {deferred} recipient(s) waiting",
        messages.len()
    );
    if deferred == 0 {
        return Ok(ExitCode::SUCCESS);
    }
    println!();
    println!("By destination:");
    for (d, n) in &by_domain {
        println!("{n:>7}  {d}");
    }
    println!();
    println!("By reason:");
    for (r, n) in &by_reason {
        println!("{n:>7}  {r}");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(1_795_440_864), "2026-11-23 13:34:24");
    }

    #[test]
    fn reasons_are_comparable() {
        assert_eq!(
            reason(Some(
                "mx1.example said: 452 4.2.2 Mailbox full (in reply to RCPT TO)"
            )),
            "452 4.2.2 Mailbox full"
        );
        assert_eq!(
            reason(Some("451 4.4.1  connect to x[1.2.3.4]:25: refused")),
            "451 4.4.1 connect to x[1.2.3.4]:25: refused"
        );
        assert_eq!(reason(None), "not attempted yet");
    }
}
