//! `estafeta sendmail`: the sendmail(8) command line, for the programs that hand mail to the
//! local MTA that way (cron, PHP's mail(), git send-email, logwatch, smartd, Symfony Mailer's
//! `sendmail -bs`). The binary behaves as `estafeta sendmail` when it is run as `sendmail`, as
//! `estafeta queue list` when run as `mailq`; `newaliases` has nothing to rebuild.
//!
//! The message goes to the running server's submit socket (`[control] submit_socket`) over
//! SMTP, as the user who runs the command: nothing here is setuid, the server learns the user
//! from the kernel (SO_PEERCRED). The result is an exit code of sysexits.h:
//!
//! | code | name | when |
//! |---|---|---|
//! | 0 | EX_OK | the server accepted the message (`250 … queued as ID`) |
//! | 64 | EX_USAGE | unknown flag, no recipients |
//! | 65 | EX_DATAERR | the sender or the message was refused (5xx to MAIL or to the end of data), no recipient in the header with `-t` |
//! | 67 | EX_NOUSER | a recipient was refused (5xx to RCPT); nothing was sent |
//! | 69 | EX_UNAVAILABLE | the submit socket cannot be reached (server not running), or the server refuses the session (5xx) |
//! | 70 | EX_SOFTWARE | the server answered something that is not SMTP |
//! | 74 | EX_IOERR | reading the standard input failed, or the connection broke |
//! | 75 | EX_TEMPFAIL | a temporary refusal (4xx), the server busy or stopping |
//! | 78 | EX_CONFIG | the configuration file is broken |

mod client;
mod message;

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use estafeta_config::Config;

use client::{Smtp, relay_smtp};

pub use message::{Message, parse_address_list};

/// sysexits.h: command line usage error.
pub const EX_USAGE: u8 = 64;
/// sysexits.h: data format error.
pub const EX_DATAERR: u8 = 65;
/// sysexits.h: addressee unknown.
pub const EX_NOUSER: u8 = 67;
/// sysexits.h: service unavailable.
pub const EX_UNAVAILABLE: u8 = 69;
/// sysexits.h: internal software error.
pub const EX_SOFTWARE: u8 = 70;
/// sysexits.h: input/output error.
pub const EX_IOERR: u8 = 74;
/// sysexits.h: temporary failure; the user is invited to retry.
pub const EX_TEMPFAIL: u8 = 75;
/// sysexits.h: configuration error.
pub const EX_CONFIG: u8 = 78;

/// Where the submit socket is when the configuration cannot be read (the packaged default).
pub const FALLBACK_SOCKET: &str = "/run/estafeta/submit.sock";

const USAGE: &str = "usage: sendmail [-t] [-i] [-f SENDER] [-F NAME] [-N DSN] [-R RET] [-V ENVID] [-v] [-C CONFIG] [--] [RCPT...]\n       sendmail -bs | -bp | -bi | -q";

/// What the command is asked to do (`-b…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// `-bm` (the default): read a message and submit it.
    #[default]
    Deliver,
    /// `-bs`: speak SMTP on stdin/stdout (relayed to the server byte for byte).
    Smtp,
    /// `-bp`: list the queue (`mailq`).
    ListQueue,
    /// `-q`: attempt the deferred messages now.
    FlushQueue,
    /// `-bi`, `-I`: rebuild the aliases (`newaliases`): nothing to do here.
    NewAliases,
}

/// The parsed command line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Options {
    /// `-b…`, `-q`, `-I`.
    pub mode: Mode,
    /// `-t`: recipients from To, Cc and Bcc (added to those of the command line).
    pub extract: bool,
    /// `-i`, `-oi`: a line with a single `.` is content, not the end.
    pub ignore_dots: bool,
    /// `-f ADDR`, `-r ADDR`: the envelope sender.
    pub sender: Option<String>,
    /// `-F NAME`: the full name for an added `From:`.
    pub full_name: Option<String>,
    /// `-v`: show the SMTP dialogue on stderr.
    pub verbose: bool,
    /// `-N never|success,failure,delay`: DSN NOTIFY for every recipient.
    pub notify: Option<String>,
    /// `-R full|hdrs`: DSN RET.
    pub ret: Option<String>,
    /// `-V ENVID`: DSN ENVID.
    pub envid: Option<String>,
    /// `-C FILE`: the configuration file (instead of the search).
    pub config: Option<PathBuf>,
    /// The recipients on the command line.
    pub recipients: Vec<String>,
}

/// Parses sendmail's command line (without the program name) the way getopt(3) does with
/// Postfix's option string: flags may be grouped (`-ti`), an option's argument is attached
/// (`-fuser`, `-oi`, `-bs`) or the next word (`-f user`), `--` ends the options, other words
/// are recipients wherever they stand. Options that do not matter here are accepted and
/// ignored (every `-o…`, `-B`, `-G`, `-h`, `-L`, `-m`, `-n`, `-O`, `-U`, `-X`, `-x`…), as
/// Postfix does; anything else is a usage error.
pub fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut o = Options::default();
    let mut words = args.iter();
    while let Some(word) = words.next() {
        if word == "--" {
            o.recipients.extend(words.by_ref().cloned());
            break;
        }
        let Some(flags) = word.strip_prefix('-').filter(|f| !f.is_empty()) else {
            o.recipients.push(word.clone());
            continue;
        };
        for (i, flag) in flags.char_indices() {
            let attached = &flags[i + flag.len_utf8()..];
            // The argument of an option that takes one: the rest of this word, or the next.
            let mut argument = || -> Result<String, String> {
                if !attached.is_empty() {
                    Ok(attached.to_string())
                } else {
                    words
                        .next()
                        .cloned()
                        .ok_or_else(|| format!("option -{flag} needs an argument"))
                }
            };
            match flag {
                't' => o.extract = true,
                'i' => o.ignore_dots = true,
                'v' => o.verbose = true,
                'G' | 'U' | 'm' | 'n' | 'x' | 'c' => {}
                'I' => o.mode = Mode::NewAliases,
                'q' => {
                    // `-q`, `-q1h`, `-qIid`: attempt the queue now (the interval is ignored).
                    o.mode = Mode::FlushQueue;
                    break;
                }
                'f' | 'r' => o.sender = Some(argument()?),
                'F' => o.full_name = Some(argument()?),
                'N' => o.notify = Some(argument()?),
                'R' => o.ret = Some(argument()?),
                'V' => o.envid = Some(argument()?),
                'C' => o.config = Some(PathBuf::from(argument()?)),
                'o' => {
                    if argument()? == "i" {
                        o.ignore_dots = true;
                    }
                }
                'B' | 'L' | 'O' | 'X' | 'e' | 'h' | 'p' => {
                    argument()?;
                }
                'b' => {
                    o.mode = match argument()?.as_str() {
                        "m" => Mode::Deliver,
                        "s" => Mode::Smtp,
                        "p" => Mode::ListQueue,
                        "i" => Mode::NewAliases,
                        other => return Err(format!("-b{other}: not supported")),
                    }
                }
                other => return Err(format!("unknown option -{other}")),
            }
            if "frFNRVCobBLOXehp".contains(flag) {
                break; // the argument took the rest of the word (or the next word)
            }
        }
    }
    if let Some(n) = &o.notify {
        let n = n.to_ascii_uppercase();
        let words: Vec<&str> = n.split(',').map(str::trim).collect();
        let known = |w: &&str| matches!(*w, "NEVER" | "SUCCESS" | "FAILURE" | "DELAY");
        if !words.iter().all(known) || (words.contains(&"NEVER") && words.len() > 1) {
            return Err(format!(
                "-N {n}: expected never, or a list of success, failure, delay"
            ));
        }
        o.notify = Some(words.join(","));
    }
    if let Some(r) = &o.ret {
        let r = r.to_ascii_uppercase();
        if r != "FULL" && r != "HDRS" {
            return Err(format!("-R {r}: expected full or hdrs"));
        }
        o.ret = Some(r);
    }
    Ok(o)
}

/// A failure: the exit code and what to say on stderr.
#[derive(Debug)]
struct Failure {
    code: u8,
    message: String,
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

/// The configuration file by the search every command uses ([`crate::find_config`]).
fn find_config() -> Option<PathBuf> {
    crate::find_config(None)
}

/// Where the server is, as far as this user can tell.
struct Target {
    /// The configuration, when it could be read.
    config: Option<Config>,
    /// The submit socket.
    socket: PathBuf,
    /// Why the fallback socket is used, said only when it does not answer either.
    note: Option<String>,
}

/// The configuration (`-C`, else the search) and the submit socket it names. A file that
/// this user may not read (mode 0640 root:estafeta) is no error: the packaged socket path
/// is tried instead.
fn target(explicit: Option<&Path>) -> Result<Target, Failure> {
    let path = explicit.map(Path::to_path_buf).or_else(find_config);
    let Some(path) = path else {
        let config = Config::embedded_default();
        return Ok(Target {
            socket: config.control.submit_socket.clone(),
            config: Some(config),
            note: None,
        });
    };
    if let Err(e) = std::fs::File::open(&path) {
        if e.kind() == io::ErrorKind::PermissionDenied {
            return Ok(Target {
                config: None,
                socket: PathBuf::from(FALLBACK_SOCKET),
                note: Some(format!(
                    "{} is not readable by this user ({e}), so the default socket was tried",
                    path.display()
                )),
            });
        }
        return Err(fail(
            EX_CONFIG,
            format!("configuration {}: {e}", path.display()),
        ));
    }
    match Config::from_file(&path) {
        Ok(config) => Ok(Target {
            socket: config.control.submit_socket.clone(),
            config: Some(config),
            note: None,
        }),
        Err(errors) => Err(fail(EX_CONFIG, format!("{errors}"))),
    }
}

/// `estafeta sendmail ARGS` (and the binary run as `sendmail`).
pub fn run(args: &[String]) -> ExitCode {
    let options = match parse_args(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("sendmail: {e}\n{USAGE}");
            return ExitCode::from(EX_USAGE);
        }
    };
    let result = match options.mode {
        Mode::NewAliases => {
            newaliases();
            Ok(())
        }
        Mode::ListQueue => return queue(options.config.as_deref(), false),
        Mode::FlushQueue => return queue(options.config.as_deref(), true),
        Mode::Smtp => target(options.config.as_deref()).and_then(|t| relay_smtp(&t)),
        Mode::Deliver => deliver(&options),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("sendmail: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// `mailq` (and `sendmail -bp`): `estafeta queue list`; `sendmail -q`: `estafeta queue flush`.
fn queue(explicit: Option<&Path>, flush: bool) -> ExitCode {
    let cfg = match target(explicit) {
        Ok(Target {
            config: Some(c), ..
        }) => c,
        Ok(Target { note, .. }) => {
            eprintln!(
                "mailq: {}; the queue is readable only with the configuration (run as root or as the service user)",
                note.unwrap_or_default()
            );
            return ExitCode::from(EX_CONFIG);
        }
        Err(f) => {
            eprintln!("mailq: {}", f.message);
            return ExitCode::from(f.code);
        }
    };
    let command = if flush {
        crate::queue_cmd::QueueCommand::Flush {
            ids: Vec::new(),
            domain: None,
        }
    } else {
        crate::queue_cmd::QueueCommand::List
    };
    crate::queue_cmd::run(command, &cfg, false)
}

/// `newaliases`: aliases are part of the configuration, read at start.
pub fn newaliases() -> ExitCode {
    println!(
        "newaliases: nothing to rebuild: estafeta's aliases live in the configuration \
         ([domain.aliases] in estafeta.toml); run `estafeta reload` or restart after editing it"
    );
    ExitCode::SUCCESS
}

/// The binary's name decides what it is: `sendmail` (any directory), `mailq`, `newaliases`;
/// `estafeta sendmail …` too, before clap sees sendmail's flags. `None`: an ordinary
/// `estafeta` command line.
pub fn dispatch(args: &[OsString]) -> Option<ExitCode> {
    let name = args
        .first()
        .and_then(|a| Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let rest = |from: usize| -> Vec<String> {
        args.iter()
            .skip(from)
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    };
    match name.as_str() {
        "sendmail" => Some(run(&rest(1))),
        "mailq" => Some(queue(None, false)),
        "newaliases" => Some(newaliases()),
        _ if args.get(1).is_some_and(|a| a == "sendmail") => Some(run(&rest(2))),
        _ => None,
    }
}

/// The login name of this process's user: `$LOGNAME`, `$USER`, the user database.
fn login_name() -> String {
    for var in ["LOGNAME", "USER"] {
        if let Ok(v) = std::env::var(var)
            && !v.is_empty()
            && !v.contains(['@', '<', '>', ' '])
        {
            return v;
        }
    }
    // SAFETY: getuid(2) takes nothing and cannot fail.
    let uid = unsafe { libc::getuid() };
    estafeta_listener::user_name(uid).unwrap_or_else(|| format!("uid{uid}"))
}

/// `addr` with `@hostname` when it is a bare local part (`root` → `root@mx.example.org`).
fn qualify(addr: &str, hostname: &str) -> String {
    if addr.contains('@') {
        addr.to_string()
    } else {
        format!("{addr}@{hostname}")
    }
}

fn now() -> SystemTime {
    SystemTime::now()
}

/// Reads the message, then submits it.
fn deliver(o: &Options) -> Result<(), Failure> {
    if o.recipients.is_empty() && !o.extract {
        return Err(fail(
            EX_USAGE,
            format!("no recipients (name them, or use -t)\n{USAGE}"),
        ));
    }
    // The whole message first: the server's connection is not held while a slow producer
    // writes, and `-t` needs the header section anyway.
    let lines = message::read_lines(&mut io::stdin().lock(), o.ignore_dots)
        .map_err(|e| fail(EX_IOERR, format!("cannot read the message: {e}")))?;
    let mut msg = Message::parse(lines);
    let mut recipients = o
        .recipients
        .iter()
        .flat_map(|r| parse_address_list(r))
        .collect::<Vec<_>>();
    if o.extract {
        recipients.extend(msg.header_recipients());
        msg.remove_bcc();
        if recipients.is_empty() {
            return Err(fail(
                EX_DATAERR,
                "no recipients: none on the command line, none in To, Cc or Bcc (-t)",
            ));
        }
    } else if recipients.is_empty() {
        // Arguments that hold no address (`""`, `"Name <>"`).
        return Err(fail(
            EX_USAGE,
            format!("no recipients: no address in {:?}", o.recipients),
        ));
    }
    let target = target(o.config.as_deref())?;
    let mut smtp = Smtp::connect(&target, o.verbose)?;
    // The hostname qualifies bare names: the configuration's, else the one the server
    // greets with (the same).
    let hostname = target
        .config
        .as_ref()
        .map(|c| c.hostname.clone())
        .unwrap_or_else(|| smtp.greeting_host.clone());
    let sender = match o.sender.as_deref().map(str::trim) {
        Some("" | "<>") => String::new(),
        // `-f 'Alice <alice@example.org>'` is accepted, as Postfix does: its first address.
        Some(s) => {
            let first = message::parse_address_list(s).into_iter().next();
            let addr = first
                .unwrap_or_else(|| s.trim_start_matches('<').trim_end_matches('>').to_string());
            qualify(&addr, &hostname)
        }
        None => qualify(&login_name(), &hostname),
    };
    // Once each (the same address on the command line and in To: with -t, say).
    let mut seen = std::collections::HashSet::new();
    let recipients: Vec<String> = recipients
        .iter()
        .map(|r| qualify(r, &hostname))
        .filter(|r| seen.insert(r.to_lowercase()))
        .collect();
    add_missing_fields(&mut msg, &sender, o.full_name.as_deref(), &hostname, now());
    smtp.transaction(o, &sender, &recipients, &msg)
}

/// What Postfix adds to a locally submitted message that lacks it: From (with `-F`'s full
/// name), Date, Message-ID.
fn add_missing_fields(
    msg: &mut Message,
    sender: &str,
    full_name: Option<&str>,
    hostname: &str,
    now: SystemTime,
) {
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    if !msg.has("from") {
        let from_addr = if sender.is_empty() {
            format!("MAILER-DAEMON@{hostname}")
        } else {
            sender.to_string()
        };
        let value = match full_name.map(str::trim).filter(|n| !n.is_empty()) {
            Some(name) => format!("{} <{from_addr}>", display_name(name)),
            None => from_addr,
        };
        msg.add_field("From", &value);
    }
    if !msg.has("date") {
        msg.add_field("Date", &estafeta_proto::trace::rfc5322_date(secs.as_secs()));
    }
    if !msg.has("message-id") {
        msg.add_field(
            "Message-ID",
            &format!(
                "<{}.{}.{:x}@{hostname}>",
                secs.as_secs(),
                std::process::id(),
                secs.subsec_nanos()
            ),
        );
    }
}

/// A display name as a phrase (RFC 5322 §3.2.5): as it is when it is only atoms, quoted
/// otherwise.
fn display_name(name: &str) -> String {
    let atext = |c: char| c.is_alphanumeric() || " !#$%&'*+-/=?^_`{|}~".contains(c);
    if name.chars().all(atext) {
        name.to_string()
    } else {
        let escaped: String = name
            .chars()
            .filter(|c| !c.is_control())
            .flat_map(|c| match c {
                '"' | '\\' => vec!['\\', c],
                c => vec![c],
            })
            .collect();
        format!("\"{escaped}\"")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::client::xtext;
    use super::*;

    fn parse(args: &[&str]) -> Result<Options, String> {
        parse_args(&args.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn flags_the_usual_callers_use() {
        // cron (cronie): sendmail -FCronDaemon -i -B8BITMIME -oem root
        let o = parse(&["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"]).unwrap();
        assert_eq!(o.full_name.as_deref(), Some("CronDaemon"));
        assert!(o.ignore_dots && !o.extract);
        assert_eq!(o.recipients, ["root"]);
        // PHP's sendmail_path default: sendmail -t -i; git send-email: -i -f addr -- rcpts
        let o = parse(&["-t", "-i"]).unwrap();
        assert!(o.extract && o.ignore_dots);
        let o = parse(&[
            "-i",
            "-f",
            "a@x.example",
            "--",
            "-b@y.example",
            "c@y.example",
        ])
        .unwrap();
        assert_eq!(o.sender.as_deref(), Some("a@x.example"));
        assert_eq!(o.recipients, ["-b@y.example", "c@y.example"]);
        // Symfony Mailer: sendmail -bs; mailq: -bp; grouped flags; -oi; -faddr
        assert_eq!(parse(&["-bs"]).unwrap().mode, Mode::Smtp);
        assert_eq!(parse(&["-bp"]).unwrap().mode, Mode::ListQueue);
        assert_eq!(parse(&["-bm", "x"]).unwrap().mode, Mode::Deliver);
        assert_eq!(parse(&["-bi"]).unwrap().mode, Mode::NewAliases);
        assert_eq!(parse(&["-q"]).unwrap().mode, Mode::FlushQueue);
        assert_eq!(parse(&["-q1h"]).unwrap().mode, Mode::FlushQueue);
        let o = parse(&["-ti", "-oi", "-faddr@x.example", "-v"]).unwrap();
        assert!(o.extract && o.ignore_dots && o.verbose);
        assert_eq!(o.sender.as_deref(), Some("addr@x.example"));
        // Options after recipients (GNU getopt permutes).
        let o = parse(&["bob", "-oi", "-r", "s@x.example"]).unwrap();
        assert_eq!(o.recipients, ["bob"]);
        assert_eq!(o.sender.as_deref(), Some("s@x.example"));
    }

    #[test]
    fn dsn_options() {
        let o = parse(&["-N", "success, failure", "-R", "hdrs", "-V", "id+1", "x"]).unwrap();
        assert_eq!(o.notify.as_deref(), Some("SUCCESS,FAILURE"));
        assert_eq!(o.ret.as_deref(), Some("HDRS"));
        assert_eq!(o.envid.as_deref(), Some("id+1"));
        assert_eq!(xtext("id+1 ="), "id+2B1+20+3D");
        assert!(parse(&["-N", "never,success", "x"]).is_err());
        assert!(parse(&["-R", "most", "x"]).is_err());
    }

    #[test]
    fn every_o_option_is_ignored_others_are_errors() {
        for o in ["-oQ/var/spool", "-oem", "-odb", "-o7", "-oA/etc/aliases"] {
            let p = parse(&[o, "x"]).unwrap();
            assert!(!p.ignore_dots, "{o}");
            assert_eq!(p.recipients, ["x"]);
        }
        assert!(parse(&["-o", "i", "x"]).unwrap().ignore_dots);
        for bad in ["-k", "-bd", "-bv", "--help", "-f"] {
            assert!(parse(&[bad]).is_err(), "{bad}");
        }
    }

    #[test]
    fn added_fields() {
        let mut m = Message::parse(vec![b"To: bob@x.example".to_vec()]);
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_795_432_613, 0xabc);
        add_missing_fields(
            &mut m,
            "alice@h.example",
            Some("Alice Q. Doe"),
            "h.example",
            t,
        );
        let text = String::from_utf8(m.to_data()).unwrap();
        assert!(
            text.contains("From: \"Alice Q. Doe\" <alice@h.example>\r\n"),
            "{text}"
        );
        assert!(text.contains("Date: Mon, 23 Nov 2026 11:16:53 +0000\r\n"));
        assert!(text.contains("@h.example>\r\n"));
        // Present fields are left alone.
        let mut m = Message::parse(vec![
            b"From: x@y.example".to_vec(),
            b"Date: then".to_vec(),
            b"Message-ID: <1@y>".to_vec(),
        ]);
        add_missing_fields(&mut m, "a@b.example", Some("A"), "b.example", t);
        assert_eq!(m.fields.len(), 3);
        assert_eq!(display_name("Cron Daemon"), "Cron Daemon");
        assert_eq!(display_name("a \"b\""), "\"a \\\"b\\\"\"");
        assert_eq!(qualify("root", "h.example"), "root@h.example");
        assert_eq!(qualify("r@x", "h.example"), "r@x");
    }
}
