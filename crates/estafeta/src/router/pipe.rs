//! The pipe agent: delivery to a command (`[pipe.NAME]`, `delivery = "pipe:NAME"`), for
//! mailing-list managers and scripts, as Postfix's pipe(8) does it.
//!
//! One process per recipient, never through a shell: the argv template's `{sender}`,
//! `{recipient}`, `{user}`, `{extension}`, `{domain}` and `{original_recipient}` are replaced
//! in each argument. The message goes to its standard input with `Return-Path:` and
//! `Delivered-To:` on top (as local delivery writes them); the environment holds only `PATH`
//! and those values (`SENDER`, `RECIPIENT`, `USER`, `EXTENSION`, `DOMAIN`,
//! `ORIGINAL_RECIPIENT`). The exit status is read as sysexits.h says, with Postfix's table:
//! 0 delivered; `EX_TEMPFAIL` (75), `EX_OSERR` (71) or a signal: try again; any other
//! status: bounce, with the first lines the command printed. Over its time limit the command
//! and its process group are killed and the message returned (5.3.0), as Postfix does.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use estafeta_config::PipeConfig;
use estafeta_policy::{LocalMailbox, Policy, Route};
use estafeta_proto::reply::Status;
use estafeta_proto::{Recipient, reply};
use estafeta_queue::{DeliveryJob, Failure, Outcome, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What a command may print that is kept for the log and the bounce.
const OUTPUT_LIMIT: usize = 2048;

/// Delivers recipients routed to a pipe.
#[derive(Debug)]
pub struct PipeAgent {
    pub(crate) policy: Arc<Policy>,
    pub(crate) pipes: BTreeMap<String, PipeConfig>,
    /// The server's separator of sub-addresses, for `{extension}`.
    pub(crate) separator: Option<String>,
    /// The uid and gid each pipe runs as, resolved when the router is built (`None`: the
    /// server's own).
    pub(crate) users: BTreeMap<String, Option<(u32, u32)>>,
}

impl Transport for PipeAgent {
    fn agent(&self, _: &estafeta_proto::Envelope, _: usize) -> &'static str {
        "pipe"
    }

    async fn deliver(&self, job: &DeliveryJob) -> Vec<(usize, Outcome)> {
        let mut outcomes = Vec::with_capacity(job.rcpts.len());
        for &i in &job.rcpts {
            let rcpt = &job.envelope.rcpts[i];
            let outcome = match self.policy.route(&rcpt.path) {
                Route::Pipe { mailbox, pipe } => match self.pipes.get(&pipe) {
                    Some(cfg) => self.run(&pipe, cfg, job, rcpt, &mailbox).await,
                    None => Outcome::TempFail(Failure::local(reply::local_delivery_failed(
                        &format!("no [pipe.{pipe}] in the configuration"),
                    ))),
                },
                _ => Outcome::PermFail(Failure::local(reply::user_unknown(&rcpt.path.to_string()))),
            };
            outcomes.push((i, outcome));
        }
        outcomes
    }
}

/// The values a command's arguments and environment are given.
struct Values {
    sender: String,
    recipient: String,
    user: String,
    extension: String,
    domain: String,
    original: String,
}

impl Values {
    /// The argument with each `{name}` replaced, in one pass: a value that holds `{…}`
    /// itself (a sender can write anything) is not expanded again.
    fn expand(&self, arg: &str) -> String {
        let mut out = String::with_capacity(arg.len());
        let mut rest = arg;
        while let Some(i) = rest.find('{') {
            out.push_str(&rest[..i]);
            let after = &rest[i..];
            let var = after.find('}').map(|j| (&after[1..j], j));
            let value = var.and_then(|(name, _)| match name {
                "sender" => Some(&self.sender),
                "recipient" => Some(&self.recipient),
                "user" => Some(&self.user),
                "extension" => Some(&self.extension),
                "domain" => Some(&self.domain),
                "original_recipient" => Some(&self.original),
                _ => None,
            });
            match (value, var) {
                (Some(v), Some((_, j))) => {
                    out.push_str(v);
                    rest = &after[j + 1..];
                }
                _ => {
                    out.push('{');
                    rest = &after[1..];
                }
            }
        }
        out.push_str(rest);
        out
    }

    /// Why these values must not reach a command, if they must not: an address that starts
    /// with `-` would be read as an option by many programs (Postfix refuses such addresses
    /// at MAIL and RCPT, `allow_min_user = no`).
    fn refusal(&self) -> Option<&'static str> {
        [
            &self.sender,
            &self.recipient,
            &self.original,
            &self.extension,
        ]
        .iter()
        .any(|v| v.starts_with('-'))
        .then_some("an address or extension that begins with '-'")
    }
}

/// Control characters (a NUL would make the command impossible to start) replaced by `_`.
fn clean(v: &str) -> String {
    v.chars()
        .map(|c| if c.is_control() { '_' } else { c })
        .collect()
}

impl PipeAgent {
    fn values(&self, job: &DeliveryJob, rcpt: &Recipient, mb: &LocalMailbox) -> Values {
        let recipient = mb.address();
        // The address the client gave (kept as ORCPT when aliases or sub-addresses changed
        // it), for the extension: `bob+lists@` → `lists`.
        let original = rcpt
            .params
            .orcpt
            .as_ref()
            .and_then(|o| estafeta_proto::command::xtext_decode(&o.xtext))
            .unwrap_or_else(|| rcpt.path.to_string());
        let extension = self
            .separator
            .as_deref()
            .and_then(|sep| {
                let local = original.rsplit_once('@').map_or(original.as_str(), |p| p.0);
                local.split_once(sep).map(|(_, ext)| ext.to_string())
            })
            .unwrap_or_default();
        let sender = match job.envelope.from.to_string() {
            s if s.is_empty() => "MAILER-DAEMON".to_string(),
            s => s,
        };
        Values {
            sender: clean(&sender),
            recipient: clean(&recipient),
            user: clean(&mb.user),
            extension: clean(&extension),
            domain: clean(&mb.domain),
            original: clean(&original),
        }
    }

    async fn run(
        &self,
        name: &str,
        cfg: &PipeConfig,
        job: &DeliveryJob,
        rcpt: &Recipient,
        mb: &LocalMailbox,
    ) -> Outcome {
        let v = self.values(job, rcpt, mb);
        if let Some(why) = v.refusal() {
            return Outcome::PermFail(Failure::local(reply::pipe_permanent(
                name,
                Status::BAD_MAILBOX_SYNTAX,
                &format!("{why} is not given to a command"),
            )));
        }
        let argv: Vec<String> = cfg.command.iter().map(|a| v.expand(a)).collect();
        let temp = |detail: String| {
            Outcome::TempFail(Failure::local(reply::pipe_temporary(name, &detail)))
        };
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("SENDER", &v.sender)
            .env("RECIPIENT", &v.recipient)
            .env("USER", &v.user)
            .env("EXTENSION", &v.extension)
            .env("DOMAIN", &v.domain)
            .env("ORIGINAL_RECIPIENT", &v.original)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .process_group(0);
        if let Some((uid, gid)) = self.users.get(name).copied().flatten() {
            cmd.uid(uid).gid(gid);
        }
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => return temp(format!("cannot run {}: {e}", argv[0])),
        };
        let mut head = format!("Return-Path: <{}>\r\n", job.envelope.from).into_bytes();
        head.extend_from_slice(format!("Delivered-To: {}\r\n", v.recipient).as_bytes());
        let mut stdin = child.stdin.take().expect("piped");
        let content = job.content.clone();
        // Written and read in tasks of their own, while the command's exit is awaited: a
        // command that prints a lot before it reads its input cannot deadlock with us, and
        // one that exits leaving a background process holding its output is not waited for.
        let writer = tokio::spawn(async move {
            // A command that exits without reading everything closes the pipe: its exit
            // status says what happened, not the write error.
            let _ = stdin.write_all(&head).await;
            // A large (mapped) message a block at a time, its pages let go as they go.
            for block in estafeta_queue::blocks(content.as_bytes(), 1 << 20) {
                if stdin.write_all(block).await.is_err() {
                    break;
                }
            }
        });
        let mut out = child.stdout.take().expect("piped");
        let mut err = child.stderr.take().expect("piped");
        let mut reader = tokio::spawn(async move {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            let _ = tokio::join!(
                read_bounded(&mut out, &mut a),
                read_bounded(&mut err, &mut b)
            );
            a.extend_from_slice(&b);
            a
        });
        let status = match tokio::time::timeout(cfg.timeout, child.wait()).await {
            Ok(s) => s,
            Err(_) => {
                kill_group(&child);
                let _ = child.kill().await;
                writer.abort();
                reader.abort();
                // As Postfix's pipe: a command that never finishes would never finish at the
                // next attempt either; the message is returned.
                return Outcome::PermFail(Failure::local(reply::pipe_permanent(
                    name,
                    Status::SYSTEM_OTHER,
                    &format!("command time limit of {} s exceeded", cfg.timeout.as_secs()),
                )));
            }
        };
        writer.abort();
        // What it printed: whatever arrives within a moment of its exit.
        let output = match tokio::time::timeout(Duration::from_secs(2), &mut reader).await {
            Ok(Ok(o)) => o,
            _ => {
                reader.abort();
                Vec::new()
            }
        };
        let output = summary(&output);
        let status = match status {
            Ok(s) => s,
            Err(e) => return temp(format!("cannot wait for the command: {e}")),
        };
        tracing::debug!(pipe = name, status = ?status, output = %output, "pipe command finished");
        classify(name, status, &output)
    }
}

/// Reads everything, keeping the first `OUTPUT_LIMIT` octets.
async fn read_bounded(r: &mut (impl tokio::io::AsyncRead + Unpin), keep: &mut Vec<u8>) {
    let mut buf = [0u8; 4096];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let room = OUTPUT_LIMIT.saturating_sub(keep.len());
                keep.extend_from_slice(&buf[..n.min(room)]);
            }
        }
    }
}

/// The command's output on one line, for a reply.
fn summary(output: &[u8]) -> String {
    let text = String::from_utf8_lossy(output);
    let mut s: String = text
        .split(['\r', '\n'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    s.retain(|c| !c.is_control());
    if s.len() > 400 {
        let mut end = 400;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

/// The outcome of an exit status, by sysexits.h and Postfix's table of them.
fn classify(name: &str, status: std::process::ExitStatus, output: &str) -> Outcome {
    use std::os::unix::process::ExitStatusExt;
    let said = if output.is_empty() {
        String::new()
    } else {
        format!(": {output}")
    };
    let Some(code) = status.code() else {
        let sig = status.signal().unwrap_or(0);
        return Outcome::TempFail(Failure::local(reply::pipe_temporary(
            name,
            &format!("command died with signal {sig}{said}"),
        )));
    };
    if code == 0 {
        return Outcome::Delivered(format!("pipe {name} (exit 0)"));
    }
    let status = match code {
        64 => Status::SYSTEM_OTHER,         // EX_USAGE
        65 => Status::MEDIA_OTHER,          // EX_DATAERR
        66 => Status::SYSTEM_OTHER,         // EX_NOINPUT
        67 => Status::BAD_MAILBOX,          // EX_NOUSER
        68 => Status::BAD_SYSTEM,           // EX_NOHOST
        69 => Status::SYSTEM_OTHER,         // EX_UNAVAILABLE
        70 => Status::SYSTEM_OTHER,         // EX_SOFTWARE
        71 => Status::SYSTEM_TEMPORARY,     // EX_OSERR
        72 => Status::SYSTEM_OTHER,         // EX_OSFILE
        73 => Status::MAILBOX_OTHER,        // EX_CANTCREAT
        74 => Status::SYSTEM_OTHER,         // EX_IOERR
        75 => Status::SYSTEM_TEMPORARY,     // EX_TEMPFAIL
        76 => Status::PROTOCOL_OTHER,       // EX_PROTOCOL
        77 => Status::SECURITY_OTHER,       // EX_NOPERM
        78 => Status::SYSTEM_MISCONFIGURED, // EX_CONFIG
        _ => Status::SYSTEM_OTHER,
    };
    let text = format!("command exited with status {code}{said}");
    if status.class == 4 {
        Outcome::TempFail(Failure::local(reply::pipe_temporary(name, &text)))
    } else {
        Outcome::PermFail(Failure::local(reply::pipe_permanent(name, status, &text)))
    }
}

/// The uid and gid each configured pipe runs as: `None` for the server's own user; an
/// error naming the pipe when its user does not exist, or is another user while the server
/// cannot switch (not root). Checked when the configuration is put in service, not at the
/// first delivery.
pub fn pipe_users(
    pipes: &BTreeMap<String, PipeConfig>,
) -> Result<BTreeMap<String, Option<(u32, u32)>>, String> {
    let mut out = BTreeMap::new();
    for (name, p) in pipes {
        let ids = match &p.user {
            None => None,
            Some(user) => switch_to(user).map_err(|e| format!("pipe.{name}.user: {e}"))?,
        };
        out.insert(name.clone(), ids);
    }
    Ok(out)
}

/// The uid and gid to run a command as `user`: `None` when that is the server's own user
/// already; an error when it is another user and the server cannot switch (not root).
fn switch_to(user: &str) -> Result<Option<(u32, u32)>, String> {
    let name = std::ffi::CString::new(user).map_err(|_| format!("invalid user name {user:?}"))?;
    // SAFETY: passwd is plain old data (integers and pointers); all zeroes is a valid value,
    // overwritten by getpwnam_r below.
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r writes into `pw` and `buf`, both ours and large enough (ERANGE
    // otherwise), and sets `found` to `&pw` or null; nothing is shared with other threads.
    let rc = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pw,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    if rc != 0 || found.is_null() {
        return Err(format!("no such user {user:?} on this system"));
    }
    let (uid, gid) = (pw.pw_uid, pw.pw_gid);
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if me == uid {
        Ok(None)
    } else if me == 0 {
        Ok(Some((uid, gid)))
    } else {
        Err(format!(
            "cannot run the command as {user:?}: the server runs as uid {me}, not root (leave `user` out, or set it to the server's user)"
        ))
    }
}

/// Kills the command and whatever it started (its process group).
fn kill_group(child: &tokio::process::Child) {
    if let Some(pid) = child.id() {
        // SAFETY: kill has no memory-safety preconditions; the group is the child's own
        // (process_group(0)), so nothing else is signalled.
        unsafe {
            libc::kill(-(pid as i32), libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    fn exit(code: i32) -> std::process::ExitStatus {
        std::process::ExitStatus::from_raw(code << 8)
    }

    #[test]
    fn sysexits() {
        assert!(matches!(classify("p", exit(0), ""), Outcome::Delivered(_)));
        assert!(matches!(classify("p", exit(75), ""), Outcome::TempFail(_)));
        assert!(matches!(classify("p", exit(71), ""), Outcome::TempFail(_)));
        let Outcome::PermFail(f) = classify("p", exit(67), "no such list") else {
            panic!()
        };
        assert_eq!(
            f.reply.to_string(),
            "550 5.1.1 pipe p: command exited with status 67: no such list"
        );
        assert!(matches!(classify("p", exit(1), ""), Outcome::PermFail(_)));
        let killed = std::process::ExitStatus::from_raw(9);
        assert!(matches!(classify("p", killed, ""), Outcome::TempFail(_)));
    }

    #[test]
    fn output_summary() {
        assert_eq!(
            summary(b"line one\r\n\r\n  line two\n"),
            "line one line two"
        );
        assert!(summary(&[b'x'; 1000]).chars().count() <= 401);
    }

    #[test]
    fn expansion() {
        let v = Values {
            sender: "a@b.example".into(),
            recipient: "list@lists.example".into(),
            user: "list".into(),
            extension: "bounces".into(),
            domain: "lists.example".into(),
            original: "list+bounces@lists.example".into(),
        };
        assert_eq!(
            v.expand("--to={user}-{extension}@{domain}"),
            "--to=list-bounces@lists.example"
        );
        assert_eq!(v.expand("{sender}"), "a@b.example");
        assert_eq!(v.expand("{nope} {user"), "{nope} {user");
        // A value holding a placeholder is not expanded again.
        let tricky = Values {
            sender: "{recipient}@evil.example".into(),
            ..v
        };
        assert_eq!(tricky.expand("{sender}"), "{recipient}@evil.example");
        assert!(tricky.refusal().is_none());
        let dash = Values {
            sender: "-oQ/tmp@evil.example".into(),
            ..tricky
        };
        assert!(dash.refusal().is_some());
        assert_eq!(clean("a\0b\nc"), "a_b_c");
    }
}
