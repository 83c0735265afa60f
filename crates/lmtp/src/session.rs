//! The async half: one LMTP session over any byte stream (a Unix socket, TCP, or an
//! in-memory pipe in tests), driving the sans-IO [`Transaction`] with bounded reads and
//! timed waits.

use std::time::Duration;

use estafeta_proto::data::Stuffer;
use estafeta_proto::reply as replies;
use estafeta_proto::{MailParams, RcptParams, Reply};
use estafeta_queue::{Failure, Outcome};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::time::timeout;

use crate::Timeouts;
use crate::wire::{
    Broken, Extensions, MAX_REPLY_LINE, ReplyAssembler, Step, Transaction, Verification,
    mail_command, rcpt_command, unsafe_address,
};

/// The size of one block of content written under one command timeout.
const DATA_BLOCK: usize = 64 * 1024;

/// An LMTP session after its greeting and LHLO, ready for transactions.
pub(crate) struct Session<S> {
    stream: BufReader<S>,
    ext: Extensions,
    /// The server's address (`unix:/run/dovecot/lmtp`), for [`Failure::remote`].
    remote: String,
    /// `LMTP server <address>`, for the replies written here.
    peer: String,
    timeouts: Timeouts,
}

impl<S> std::fmt::Debug for Session<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("remote", &self.remote)
            .field("ext", &self.ext)
            .finish()
    }
}

/// A failure this side writes about a broken step (no remote server said it).
fn local(reply: Reply, command: Option<&str>) -> Failure {
    Failure {
        reply,
        remote: None,
        command: command.map(str::to_string),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// Reads the greeting and says LHLO (RFC 2033 §4.1). A refusal or a broken stream is the
    /// failure every recipient gets.
    pub async fn start(
        stream: S,
        lhlo_name: &str,
        remote: &str,
        timeouts: Timeouts,
    ) -> Result<Self, Failure> {
        let mut s = Session {
            stream: BufReader::new(stream),
            ext: Extensions::default(),
            remote: remote.to_string(),
            peer: format!("LMTP server {remote}"),
            timeouts,
        };
        let t = timeouts.command;
        let greeting = s
            .read_reply(t)
            .await
            .map_err(|b| s.broken(b, "receiving the initial server greeting", None))?;
        if greeting.code != 220 {
            return Err(s.remote_failure(greeting, "the initial server greeting"));
        }
        s.write(format!("LHLO {lhlo_name}\r\n").as_bytes(), t)
            .await
            .map_err(|b| s.broken(b, "sending LHLO", Some("LHLO")))?;
        let reply = s
            .read_reply(t)
            .await
            .map_err(|b| s.broken(b, "receiving the LHLO reply", Some("LHLO")))?;
        if reply.code / 100 != 2 {
            return Err(s.remote_failure(reply, "LHLO"));
        }
        s.ext = Extensions::parse(&reply);
        tracing::debug!(server = %s.remote, ext = ?s.ext, "LMTP session started");
        Ok(s)
    }

    /// RSET (before a pooled session is used again): `Err` when the session is unusable.
    pub async fn rset(&mut self) -> Result<(), Failure> {
        let t = self.timeouts.command;
        self.write(b"RSET\r\n", t)
            .await
            .map_err(|b| self.broken(b, "sending RSET", Some("RSET")))?;
        let reply = self
            .read_reply(t)
            .await
            .map_err(|b| self.broken(b, "receiving the RSET reply", Some("RSET")))?;
        if reply.code / 100 != 2 {
            return Err(self.remote_failure(reply, "RSET"));
        }
        Ok(())
    }

    /// Says QUIT, waits briefly for the reply and closes.
    pub async fn quit(mut self) {
        let t = self.timeouts.command.min(Duration::from_secs(5));
        if self.write(b"QUIT\r\n", t).await.is_ok() {
            let _ = self.read_reply(t).await;
        }
        let _ = timeout(Duration::from_secs(1), self.stream.shutdown()).await;
    }

    /// One transaction: one outcome per recipient, in order, and whether the session can
    /// carry another.
    pub async fn deliver(
        &mut self,
        from: &str,
        params: &MailParams,
        rcpts: &[(String, RcptParams)],
        content: &[u8],
    ) -> (Vec<Outcome>, bool) {
        let mut tx = Transaction::new(&self.remote, rcpts.iter().map(|(a, _)| a.clone()).collect());
        if unsafe_address(from) {
            let refused = Outcome::PermFail(Failure::local(replies::bad_sender_syntax(
                "line break or angle bracket in address",
            )));
            for i in 0..rcpts.len() {
                tx.refuse(i, refused.clone());
            }
            return (tx.finish(), true);
        }
        for (i, (addr, _)) in rcpts.iter().enumerate() {
            if unsafe_address(addr) {
                tx.refuse(
                    i,
                    Outcome::PermFail(Failure::local(replies::bad_recipient_syntax(
                        "line break or angle bracket in address",
                    ))),
                );
            }
        }
        let usable = match self
            .transaction(&mut tx, from, params, rcpts, content)
            .await
        {
            Ok(Step::Closed) => false,
            Ok(Step::Continue | Step::Done) => true,
            Err(failure) => {
                tx.broken(failure);
                false
            }
        };
        (tx.finish(), usable)
    }

    async fn transaction(
        &mut self,
        tx: &mut Transaction,
        from: &str,
        params: &MailParams,
        rcpts: &[(String, RcptParams)],
        content: &[u8],
    ) -> Result<Step, Failure> {
        let t = self.timeouts;
        let open: Vec<usize> = (0..rcpts.len()).filter(|&i| tx.open(i)).collect();
        if open.is_empty() {
            return Ok(Step::Done);
        }
        // The size of the content as the server stores it: what SIZE= announces.
        let size = content.len();
        let mail = mail_command(from, params, &self.ext, size);
        let mail_name = format!("MAIL FROM:<{from}>");
        let commands: Vec<String> = open
            .iter()
            .map(|&i| rcpt_command(&rcpts[i].0, &rcpts[i].1, &self.ext))
            .collect();

        // MAIL and every RCPT in one write when the server offers PIPELINING (RFC 2920);
        // DATA goes separately, only once a recipient was accepted.
        let step =
            if self.ext.pipelining {
                let mut group = mail;
                for c in &commands {
                    group.push_str(c);
                }
                self.write(group.as_bytes(), t.command)
                    .await
                    .map_err(|b| self.broken(b, "sending MAIL FROM", Some(&mail_name)))?;
                let reply = self.read_reply(t.command).await.map_err(|b| {
                    self.broken(b, "receiving the MAIL FROM reply", Some(&mail_name))
                })?;
                let mut step = tx.mail(&reply, &mail_name);
                for &i in &open {
                    if step == Step::Closed {
                        break;
                    }
                    let name = tx.rcpt_name(i);
                    let reply = self
                        .read_reply(t.command)
                        .await
                        .map_err(|b| self.broken(b, "receiving the RCPT TO reply", Some(&name)))?;
                    // After a refused MAIL the RCPT replies are read and ignored (503s), unless
                    // one ends the session.
                    if step == Step::Continue {
                        step = tx.rcpt(i, &reply);
                    } else if reply.code == 421 {
                        step = Step::Closed;
                    }
                }
                step
            } else {
                self.write(mail.as_bytes(), t.command)
                    .await
                    .map_err(|b| self.broken(b, "sending MAIL FROM", Some(&mail_name)))?;
                let reply = self.read_reply(t.command).await.map_err(|b| {
                    self.broken(b, "receiving the MAIL FROM reply", Some(&mail_name))
                })?;
                let mut step = tx.mail(&reply, &mail_name);
                for (&i, command) in open.iter().zip(&commands) {
                    if step != Step::Continue {
                        break;
                    }
                    let name = tx.rcpt_name(i);
                    self.write(command.as_bytes(), t.command)
                        .await
                        .map_err(|b| self.broken(b, "sending RCPT TO", Some(&name)))?;
                    let reply = self
                        .read_reply(t.command)
                        .await
                        .map_err(|b| self.broken(b, "receiving the RCPT TO reply", Some(&name)))?;
                    step = tx.rcpt(i, &reply);
                }
                step
            };
        if step != Step::Continue || tx.accepted().is_empty() {
            return Ok(step);
        }

        self.write(b"DATA\r\n", t.command)
            .await
            .map_err(|b| self.broken(b, "sending DATA", Some("DATA")))?;
        let reply = self
            .read_reply(t.command)
            .await
            .map_err(|b| self.broken(b, "receiving the DATA reply", Some("DATA")))?;
        let step = tx.data(&reply);
        if step != Step::Continue {
            return Ok(step);
        }
        // Stuffed a block at a time: a large message is never copied whole.
        let mut wire = Vec::with_capacity(DATA_BLOCK + DATA_BLOCK / 32 + 8);
        let mut stuffer = Stuffer::default();
        let mut blocks = estafeta_queue::blocks(content, DATA_BLOCK).peekable();
        loop {
            wire.clear();
            if let Some(block) = blocks.next() {
                stuffer.feed(block, &mut wire);
            }
            let last = blocks.peek().is_none();
            if last {
                stuffer.finish(&mut wire);
            }
            self.write(&wire, t.command)
                .await
                .map_err(|b| self.broken(b, "sending the message content", Some("DATA")))?;
            if last {
                break;
            }
        }
        // RFC 2033 §4.2: one reply per accepted recipient, in the order of the RCPTs.
        for _ in 0..tx.accepted().len() {
            let reply = self.read_reply(t.data_end).await.map_err(|b| {
                self.broken(b, "receiving the end of data replies", Some("end of data"))
            })?;
            match tx.final_reply(&reply) {
                Step::Continue => {}
                other => return Ok(other),
            }
        }
        Ok(Step::Done)
    }

    /// The probe for [`crate::Lmtp::verify`]: `MAIL FROM:<>`, `RCPT TO:<rcpt>`, `RSET`.
    /// Returns the answer and whether the session can carry another transaction.
    pub async fn probe(&mut self, rcpt: &str) -> (Verification, bool) {
        if unsafe_address(rcpt) {
            let reply = replies::bad_recipient_syntax("line break or angle bracket in address");
            return (Verification::Unknown(reply), true);
        }
        match self.probe_steps(rcpt).await {
            Ok(answer) => (answer, true),
            Err((answer, usable)) => (answer, usable),
        }
    }

    async fn probe_steps(&mut self, rcpt: &str) -> Result<Verification, (Verification, bool)> {
        let t = self.timeouts.command;
        let unavailable = |f: Failure| (Verification::Unavailable(f.reply), false);
        let mail = "MAIL FROM:<>\r\n";
        let rcpt_line = rcpt_command(rcpt, &RcptParams::default(), &Extensions::default());
        let name = format!("RCPT TO:<{rcpt}>");
        let mail_reply;
        let rcpt_reply;
        if self.ext.pipelining {
            let group = format!("{mail}{rcpt_line}RSET\r\n");
            self.write(group.as_bytes(), t).await.map_err(|b| {
                unavailable(self.broken(b, "sending MAIL FROM", Some("MAIL FROM:<>")))
            })?;
            mail_reply = self.read_reply(t).await.map_err(|b| {
                unavailable(self.broken(b, "receiving the MAIL FROM reply", Some("MAIL FROM:<>")))
            })?;
            rcpt_reply = self.read_reply(t).await.map_err(|b| {
                unavailable(self.broken(b, "receiving the RCPT TO reply", Some(&name)))
            })?;
        } else {
            self.write(mail.as_bytes(), t).await.map_err(|b| {
                unavailable(self.broken(b, "sending MAIL FROM", Some("MAIL FROM:<>")))
            })?;
            mail_reply = self.read_reply(t).await.map_err(|b| {
                unavailable(self.broken(b, "receiving the MAIL FROM reply", Some("MAIL FROM:<>")))
            })?;
            if mail_reply.code / 100 == 2 {
                self.write(rcpt_line.as_bytes(), t)
                    .await
                    .map_err(|b| unavailable(self.broken(b, "sending RCPT TO", Some(&name))))?;
                rcpt_reply = self.read_reply(t).await.map_err(|b| {
                    unavailable(self.broken(b, "receiving the RCPT TO reply", Some(&name)))
                })?;
            } else {
                rcpt_reply = mail_reply.clone();
            }
            self.write(b"RSET\r\n", t)
                .await
                .map_err(|b| unavailable(self.broken(b, "sending RSET", Some("RSET"))))?;
        }
        let rset = self.read_reply(t).await;
        let usable = matches!(&rset, Ok(r) if r.code / 100 == 2)
            && mail_reply.code != 421
            && rcpt_reply.code != 421;
        let answer = if mail_reply.code / 100 != 2 {
            // The server refused the null sender: it cannot say anything about the user.
            let f = match crate::wire::classify(&mail_reply, "MAIL FROM:<>", &self.remote) {
                Outcome::TempFail(f) | Outcome::PermFail(f) => f.reply,
                Outcome::Delivered(_) | Outcome::Relayed { .. } => mail_reply.clone(),
            };
            Verification::Unavailable(f)
        } else {
            Verification::from_rcpt_reply(&rcpt_reply, &name, &self.remote)
        };
        if usable {
            Ok(answer)
        } else {
            Err((answer, false))
        }
    }

    // ---- failures ------------------------------------------------------------------------

    fn broken(&self, broken: Broken, doing: &str, command: Option<&str>) -> Failure {
        local(broken.reply(&self.peer, doing), command)
    }

    fn remote_failure(&self, reply: Reply, command: &str) -> Failure {
        Failure {
            reply,
            remote: Some(self.remote.clone()),
            command: Some(command.to_string()),
        }
    }

    // ---- bytes ---------------------------------------------------------------------------

    async fn write(&mut self, bytes: &[u8], limit: Duration) -> Result<(), Broken> {
        if tracing::enabled!(tracing::Level::TRACE) {
            tracing::trace!(server = %self.remote, out = %String::from_utf8_lossy(&bytes[..bytes.len().min(512)]));
        }
        let stream = &mut self.stream;
        let io = async {
            stream.write_all(bytes).await?;
            stream.flush().await
        };
        match timeout(limit, io).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Broken::Io(e)),
            Err(_) => Err(Broken::Timeout),
        }
    }

    async fn read_reply(&mut self, limit: Duration) -> Result<Reply, Broken> {
        let reply = match timeout(limit, read_reply(&mut self.stream)).await {
            Ok(r) => r?,
            Err(_) => return Err(Broken::Timeout),
        };
        tracing::debug!(server = %self.remote, %reply, "reply");
        Ok(reply)
    }
}

/// Reads one line, without its CRLF (or bare LF), refusing lines over [`MAX_REPLY_LINE`].
async fn read_line<R: AsyncBufReadExt + Unpin>(
    r: &mut R,
    line: &mut Vec<u8>,
) -> Result<(), Broken> {
    line.clear();
    loop {
        let buf = r.fill_buf().await.map_err(Broken::Io)?;
        if buf.is_empty() {
            return Err(Broken::Closed);
        }
        let (take, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(p) => (p + 1, true),
            None => (buf.len(), false),
        };
        if line.len() + take > MAX_REPLY_LINE + 2 {
            return Err(Broken::Malformed(format!(
                "reply line longer than {MAX_REPLY_LINE} octets"
            )));
        }
        line.extend_from_slice(&buf[..take]);
        r.consume(take);
        if done {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            return Ok(());
        }
    }
}

/// Reads one (possibly multi-line) reply, assembled by [`ReplyAssembler`].
async fn read_reply<R: AsyncBufReadExt + Unpin>(r: &mut R) -> Result<Reply, Broken> {
    let mut assembler = ReplyAssembler::default();
    let mut raw = Vec::with_capacity(128);
    loop {
        read_line(r, &mut raw).await?;
        if let Some(reply) = assembler.line(&raw)? {
            return Ok(reply);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use estafeta_proto::Status;
    use tokio::io::{AsyncReadExt, DuplexStream};

    /// One step of a scripted server: wait for a line starting with `expect` (`""`: wait
    /// for nothing; `"<data>"`: read content up to the final dot), then write `answer`
    /// (`"<close>"`: hang up; `"<silent>"`: say nothing and wait for the client to go).
    type Script = Vec<(&'static str, String)>;

    async fn server(io: DuplexStream, script: Script) -> Vec<String> {
        let mut r = BufReader::new(io);
        let mut seen = Vec::new();
        for (expect, answer) in script {
            if expect == "<data>" {
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap() == 0 {
                        return seen;
                    }
                    if line == ".\r\n" {
                        break;
                    }
                }
                seen.push("<data>".to_string());
            } else if !expect.is_empty() {
                let mut line = String::new();
                if r.read_line(&mut line).await.unwrap() == 0 {
                    return seen;
                }
                assert!(
                    line.starts_with(expect),
                    "expected {expect:?}, got {line:?}"
                );
                seen.push(line.trim_end().to_string());
            }
            match answer.as_str() {
                "<close>" => return seen,
                "<silent>" => {
                    let mut rest = Vec::new();
                    let _ = r.read_to_end(&mut rest).await;
                    return seen;
                }
                a => r.get_mut().write_all(a.as_bytes()).await.unwrap(),
            }
        }
        seen
    }

    fn start_script(lhlo: &str) -> Script {
        vec![
            ("", "220 lmtp.test ready\r\n".to_string()),
            ("LHLO mx.test", lhlo.to_string()),
        ]
    }

    const PLAIN_LHLO: &str = "250-lmtp.test\r\n250 8BITMIME\r\n";
    const PIPELINING_LHLO: &str = "250-lmtp.test\r\n250-8BITMIME\r\n250 PIPELINING\r\n";

    async fn run(
        script: Script,
        timeouts: Timeouts,
        rcpts: &[&str],
    ) -> (Result<(Vec<Outcome>, bool), Failure>, Vec<String>) {
        let (client, server_io) = tokio::io::duplex(1 << 16);
        let server = tokio::spawn(server(server_io, script));
        let rcpts: Vec<(String, RcptParams)> = rcpts
            .iter()
            .map(|r| (r.to_string(), RcptParams::default()))
            .collect();
        let result = match Session::start(client, "mx.test", "unix:/x", timeouts).await {
            Ok(mut s) => {
                let r = s
                    .deliver(
                        "s@d",
                        &MailParams::default(),
                        &rcpts,
                        b"Subject: x\r\n\r\nhi\r\n",
                    )
                    .await;
                drop(s);
                Ok(r)
            }
            Err(f) => Err(f),
        };
        (result, server.await.unwrap())
    }

    fn short() -> Timeouts {
        Timeouts::all(Duration::from_millis(300))
    }

    #[tokio::test]
    async fn without_pipelining_one_command_at_a_time_and_no_data_without_recipients() {
        let mut script = start_script(PLAIN_LHLO);
        script.extend([
            ("MAIL FROM:<s@d>", "250 2.1.0 OK\r\n".to_string()),
            (
                "RCPT TO:<a@d>",
                "550 5.1.1 <a@d> User doesn't exist\r\n".into(),
            ),
            ("RCPT TO:<b@d>", "450 4.2.1 <b@d> try later\r\n".into()),
        ]);
        let (r, seen) = run(script, short(), &["a@d", "b@d"]).await;
        let (out, usable) = r.unwrap();
        assert!(usable);
        assert!(matches!(&out[0], Outcome::PermFail(f) if f.reply.code == 550));
        assert!(matches!(&out[1], Outcome::TempFail(f) if f.reply.code == 450));
        assert_eq!(seen.len(), 4, "no DATA: {seen:?}");
    }

    #[tokio::test]
    async fn closed_after_the_first_final_reply() {
        let mut script = start_script(PIPELINING_LHLO);
        script.extend([
            ("MAIL FROM:<s@d>", "250 2.1.0 OK\r\n".to_string()),
            ("RCPT TO:<a@d>", "250 2.1.5 OK\r\n".into()),
            ("RCPT TO:<b@d>", "250 2.1.5 OK\r\n".into()),
            ("DATA", "354 OK\r\n".into()),
            ("<data>", "250 2.0.0 <a@d> id Saved\r\n".into()),
            ("", "<close>".into()),
        ]);
        let (r, _) = run(script, short(), &["a@d", "b@d"]).await;
        let (out, usable) = r.unwrap();
        assert!(!usable);
        assert_eq!(
            out[0],
            Outcome::Delivered("lmtp unix:/x said: 250 2.0.0 <a@d> id Saved".into())
        );
        let Outcome::TempFail(f) = &out[1] else {
            panic!("{out:?}")
        };
        assert_eq!(f.reply.status, Some(Status::new(4, 4, 2)));
        assert_eq!(f.command.as_deref(), Some("end of data"));
        assert!(
            f.reply
                .text()
                .contains("lost connection with LMTP server unix:/x"),
            "{f}"
        );
    }

    #[tokio::test]
    async fn silent_server_times_out_for_the_recipients_left() {
        let mut script = start_script(PIPELINING_LHLO);
        script.extend([
            ("MAIL FROM:<s@d>", "250 2.1.0 OK\r\n".to_string()),
            ("RCPT TO:<a@d>", "250 2.1.5 OK\r\n".into()),
            ("DATA", "354 OK\r\n".into()),
            ("<data>", "<silent>".into()),
        ]);
        let started = std::time::Instant::now();
        let (r, _) = run(script, short(), &["a@d"]).await;
        assert!(started.elapsed() < Duration::from_secs(5));
        let (out, usable) = r.unwrap();
        assert!(!usable);
        let Outcome::TempFail(f) = &out[0] else {
            panic!("{out:?}")
        };
        assert!(f.reply.text().contains("timed out"), "{f}");
    }

    #[tokio::test]
    async fn refused_greeting_and_malformed_or_endless_replies() {
        let script = vec![("", "554 5.3.2 not now\r\n".to_string())];
        let (r, _) = run(script, short(), &["a@d"]).await;
        let f = r.unwrap_err();
        assert_eq!(f.reply.code, 554);
        assert_eq!(f.remote.as_deref(), Some("unix:/x"));

        let script = vec![("", "220 ok\r\n".to_string()), ("LHLO", "hello\r\n".into())];
        let f = run(script, short(), &["a@d"]).await.0.unwrap_err();
        assert_eq!(f.reply.status, Some(Status::new(4, 5, 0)), "{f}");

        let long = format!("220 {}\r\n", "x".repeat(MAX_REPLY_LINE));
        let f = run(vec![("", long)], short(), &["a@d"])
            .await
            .0
            .unwrap_err();
        assert!(f.reply.text().contains("longer than"), "{f}");

        let many = "220-x\r\n".repeat(crate::wire::MAX_REPLY_LINES + 1);
        let f = run(vec![("", many)], short(), &["a@d"])
            .await
            .0
            .unwrap_err();
        assert!(f.reply.text().contains("lines"), "{f}");
    }

    #[tokio::test]
    async fn probe_answers_and_keeps_the_session() {
        let (client, server_io) = tokio::io::duplex(1 << 16);
        let mut script = start_script(PIPELINING_LHLO);
        script.extend([
            ("MAIL FROM:<>", "250 2.1.0 OK\r\n".to_string()),
            (
                "RCPT TO:<x@d>",
                "550 5.1.1 <x@d> User doesn't exist: x@d\r\n".into(),
            ),
            ("RSET", "250 2.0.0 OK\r\n".into()),
            ("MAIL FROM:<>", "250 2.1.0 OK\r\n".into()),
            ("RCPT TO:<a@d>", "250 2.1.5 OK\r\n".into()),
            ("RSET", "250 2.0.0 OK\r\n".into()),
            ("MAIL FROM:<>", "250 2.1.0 OK\r\n".into()),
            (
                "RCPT TO:<b@d>",
                "451 4.3.0 <b@d> Temporary internal error\r\n".into(),
            ),
            ("RSET", "<close>".into()),
        ]);
        let server = tokio::spawn(server(server_io, script));
        let mut s = Session::start(client, "mx.test", "unix:/x", short())
            .await
            .unwrap();
        let (v, usable) = s.probe("x@d").await;
        assert!(usable);
        assert!(matches!(v, Verification::Unknown(r) if r.code == 550));
        assert_eq!(s.probe("a@d").await, (Verification::Exists, true));
        let (v, usable) = s.probe("b@d").await;
        assert!(matches!(v, Verification::Unavailable(r) if r.code == 451));
        assert!(!usable, "RSET was not answered");
        let (v, usable) = s.probe("a\r\nRSET").await;
        assert!(matches!(v, Verification::Unknown(r) if r.status == Some(Status::new(5, 1, 3))));
        assert!(usable);
        drop(s);
        server.await.unwrap();
    }
}
