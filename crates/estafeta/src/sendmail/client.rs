//! The SMTP side of `sendmail`: a blocking client for one transaction on the submit socket,
//! with each refusal mapped to its sysexits.h code, and `-bs`'s byte pipe.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use estafeta_proto::reply::{self, Reply, Severity};

use super::{
    EX_DATAERR, EX_IOERR, EX_NOUSER, EX_SOFTWARE, EX_TEMPFAIL, EX_UNAVAILABLE, Failure, Message,
    Options, Target, fail,
};

/// How long to wait for any one reply of the server (its data timeout is 10 minutes by
/// default; the end of data may take a fsync on top).
const REPLY_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// An SMTP conversation with the submit socket.
pub(super) struct Smtp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    verbose: bool,
    /// The first word of the greeting: the server's hostname.
    pub(super) greeting_host: String,
    /// The EHLO keywords (upper case).
    extensions: Vec<String>,
}

/// The exit code for a refusal at a step: 4xx is temporary, 5xx is `permanent`.
fn refusal(r: &Reply, permanent: u8, what: &str) -> Failure {
    let code = match r.severity() {
        Severity::Transient => EX_TEMPFAIL,
        Severity::Permanent => permanent,
        Severity::Positive | Severity::Intermediate => EX_SOFTWARE,
    };
    fail(code, format!("{what}: {r}"))
}

pub(super) fn connect(target: &Target) -> Result<UnixStream, Failure> {
    UnixStream::connect(&target.socket).map_err(|e| {
        let mut m = format!(
            "cannot reach the mail server at {}: {e} (is estafeta running?)",
            target.socket.display()
        );
        if let Some(note) = &target.note {
            m.push_str(&format!("; {note}"));
        }
        // No socket, or nobody answering on it: the server is stopped or restarting (an
        // upgrade), which passes: EX_TEMPFAIL, the caller may try again. Anything else (no
        // permission to reach it) will not pass by itself.
        let code = match e.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => EX_TEMPFAIL,
            _ => EX_UNAVAILABLE,
        };
        fail(code, m)
    })
}

impl Smtp {
    /// Connects and reads the greeting. A busy server (`421` at the greeting: the connection
    /// caps) is tried again a few times before giving up with EX_TEMPFAIL.
    pub(super) fn connect(target: &Target, verbose: bool) -> Result<Smtp, Failure> {
        let mut delay = Duration::from_millis(250);
        let mut attempt = 1;
        loop {
            let stream = connect(target)?;
            let io = |e: io::Error| fail(EX_IOERR, format!("{}: {e}", target.socket.display()));
            stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
            stream.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
            let mut smtp = Smtp {
                reader: BufReader::new(stream.try_clone().map_err(io)?),
                writer: stream,
                verbose,
                greeting_host: String::new(),
                extensions: Vec::new(),
            };
            let greeting = smtp.reply()?;
            match greeting.severity() {
                Severity::Positive => {
                    smtp.greeting_host = greeting
                        .lines
                        .first()
                        .and_then(|l| l.split_whitespace().next())
                        .unwrap_or("localhost")
                        .to_string();
                    smtp.ehlo()?;
                    return Ok(smtp);
                }
                Severity::Transient if attempt < 6 => {
                    std::thread::sleep(delay);
                    delay *= 2;
                    attempt += 1;
                }
                _ => {
                    return Err(refusal(
                        &greeting,
                        EX_UNAVAILABLE,
                        "the server refused the session",
                    ));
                }
            }
        }
    }

    fn ehlo(&mut self) -> Result<(), Failure> {
        let r = self.command("EHLO localhost")?;
        if r.severity() != Severity::Positive {
            return Err(refusal(&r, EX_UNAVAILABLE, "EHLO"));
        }
        self.extensions = r
            .lines
            .iter()
            .skip(1)
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_ascii_uppercase)
            .collect();
        Ok(())
    }

    fn has(&self, extension: &str) -> bool {
        self.extensions.iter().any(|e| e == extension)
    }

    fn broken(e: io::Error) -> Failure {
        fail(EX_IOERR, format!("connection to the mail server lost: {e}"))
    }

    /// Reads one reply (all its lines).
    fn reply(&mut self) -> Result<Reply, Failure> {
        let mut lines = Vec::new();
        loop {
            let mut raw = Vec::new();
            let n = self
                .reader
                .read_until(b'\n', &mut raw)
                .map_err(Self::broken)?;
            if n == 0 {
                return Err(fail(
                    EX_IOERR,
                    "the mail server closed the connection unexpectedly",
                ));
            }
            if self.verbose {
                eprint!("<<< {}", String::from_utf8_lossy(&raw));
            }
            let line = raw.strip_suffix(b"\n").unwrap_or(&raw);
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let Some((code, last, text)) = reply::parse_received_line(line) else {
                return Err(fail(
                    EX_SOFTWARE,
                    format!(
                        "the mail server answered something that is not SMTP: {:?}",
                        String::from_utf8_lossy(line)
                    ),
                ));
            };
            lines.push(text);
            if last {
                return Ok(Reply::from_received(code, lines));
            }
        }
    }

    fn send(&mut self, bytes: &[u8]) -> Result<(), Failure> {
        self.writer.write_all(bytes).map_err(Self::broken)
    }

    fn command(&mut self, line: &str) -> Result<Reply, Failure> {
        if self.verbose {
            eprintln!(">>> {line}");
        }
        self.send(format!("{line}\r\n").as_bytes())?;
        self.reply()
    }

    /// MAIL, RCPT for each recipient, DATA. All or nothing: when a recipient is refused,
    /// the transaction is abandoned, so that a caller who retries sends no duplicates.
    pub(super) fn transaction(
        &mut self,
        o: &Options,
        sender: &str,
        recipients: &[String],
        msg: &Message,
    ) -> Result<(), Failure> {
        let mut mail = format!("MAIL FROM:<{sender}>");
        let utf8 = !sender.is_ascii() || recipients.iter().any(|r| !r.is_ascii());
        if utf8 && self.has("SMTPUTF8") {
            mail.push_str(" SMTPUTF8");
        }
        if msg.is_8bit() && self.has("8BITMIME") {
            mail.push_str(" BODY=8BITMIME");
        }
        let dsn = self.has("DSN");
        if dsn {
            if let Some(ret) = &o.ret {
                mail.push_str(&format!(" RET={ret}"));
            }
            if let Some(envid) = &o.envid {
                mail.push_str(&format!(" ENVID={}", xtext(envid)));
            }
        }
        let r = self.command(&mail)?;
        if r.severity() != Severity::Positive {
            self.quit();
            return Err(refusal(
                &r,
                EX_DATAERR,
                &format!("sender <{sender}> refused"),
            ));
        }
        let mut refused: Vec<(String, Reply)> = Vec::new();
        for rcpt in recipients {
            let mut line = format!("RCPT TO:<{rcpt}>");
            if let (true, Some(n)) = (dsn, &o.notify) {
                line.push_str(&format!(" NOTIFY={n}"));
            }
            let r = self.command(&line)?;
            if r.severity() != Severity::Positive {
                refused.push((rcpt.clone(), r));
            }
        }
        if !refused.is_empty() {
            let _ = self.command("RSET");
            self.quit();
            let permanent = refused
                .iter()
                .any(|(_, r)| r.severity() == Severity::Permanent);
            let list: Vec<String> = refused.iter().map(|(a, r)| format!("<{a}>: {r}")).collect();
            return Err(fail(
                if permanent { EX_NOUSER } else { EX_TEMPFAIL },
                format!("recipient refused, message not sent: {}", list.join("; ")),
            ));
        }
        let r = self.command("DATA")?;
        if r.severity() != Severity::Intermediate {
            self.quit();
            return Err(refusal(&r, EX_UNAVAILABLE, "DATA"));
        }
        let mut data = msg.to_data();
        data.extend_from_slice(b".\r\n");
        if self.verbose {
            eprintln!(">>> ({} bytes of message)", data.len());
        }
        self.send(&data)?;
        let r = self.reply()?;
        self.quit();
        if r.severity() != Severity::Positive {
            return Err(refusal(&r, EX_DATAERR, "message refused"));
        }
        if o.verbose {
            eprintln!("sendmail: {r}");
        }
        Ok(())
    }

    fn quit(&mut self) {
        let _ = self.command("QUIT");
    }
}

/// xtext (RFC 3461 §4): `+XX` for `+`, `=`, and anything outside `!`..`~`.
pub(super) fn xtext(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// `-bs`: the standard input goes to the submit socket and the server's replies to the
/// standard output, byte for byte, until the server closes the connection. The server
/// speaks SMTP; this is only the pipe (what Symfony Mailer's `sendmail -bs` transport wants).
pub(super) fn relay_smtp(target: &Target) -> Result<(), Failure> {
    let stream = match connect(target) {
        Ok(s) => s,
        Err(f) => {
            // The client on stdin expects SMTP: tell it in SMTP, then on stderr.
            let r = reply::submission_unavailable("the mail server is not running");
            let _ = io::stdout().write_all(&r.to_bytes());
            let _ = io::stdout().flush();
            return Err(f);
        }
    };
    let mut up = stream
        .try_clone()
        .map_err(|e| fail(EX_IOERR, e.to_string()))?;
    std::thread::spawn(move || {
        let _ = io::copy(&mut io::stdin().lock(), &mut up);
        let _ = up.shutdown(std::net::Shutdown::Write);
    });
    let mut down = stream;
    let mut out = io::stdout().lock();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = match down.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Smtp::broken(e)),
        };
        // The client may go away after QUIT before reading 221: not an error of ours.
        if out.write_all(&buf[..n]).and_then(|()| out.flush()).is_err() {
            return Ok(());
        }
    }
}
