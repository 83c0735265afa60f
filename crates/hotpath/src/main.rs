//! The session hot path as a fixed, deterministic workload, for callgrind
//! (`scripts/callgrind-guard.sh` counts the instructions it takes per message).
//!
//! ```text
//! estafeta-hotpath [N]      (default 1000)
//! ```
//!
//! Runs N times the DESIGN workload, one new connection per message, through the real
//! [`Session`] and answers it the way the listener does, in memory:
//!
//! - the greeting; `EHLO`; then, pipelined (RFC 2920), `MAIL FROM` with `SIZE`, one `RCPT`
//!   and `DATA`; a 4 KiB message with dot-stuffed lines and its `.`; `QUIT`. Each round is
//!   fed as one read, as the listener feeds what one read of the socket returns;
//! - the recipient check is a local-domain check (the policy's verdict for a local domain,
//!   without the policy crate and its configuration);
//! - the accepted message gets what the spool does to it without I/O: a queue ID, the
//!   `Received:` header ([`received_header`]) and the stored content (that header, then the
//!   message). The envelope's serialisation (`serialize_envelope` in crates/queue) is private
//!   to the spool and not run here.
//!
//! No sockets, files, threads or clock: the same instructions every run. The first connection
//! is checked reply by reply and byte by byte; every connection must end with its message
//! stored and the session closed. Prints the number of messages processed.

use std::hint::black_box;
use std::net::SocketAddr;
use std::sync::Arc;

use estafeta_proto::reply::{self, Reply};
use estafeta_proto::trace::received_header;
use estafeta_proto::{Action, AuthMode, Recipient, Session, SessionConfig, VrfyMode};

const HOSTNAME: &str = "mx.example.org";
const BANNER: &str = "ESMTP estafeta";
/// The domain the recipient check accepts.
const LOCAL_DOMAIN: &str = "example.org";
/// The client's forward-confirmed reverse DNS name (the listener looks it up before the
/// session starts).
const CLIENT_NAME: &str = "mail.client.example";
/// The time of every Received header (proto has no clock; the spool passes `unix_now()`).
const NOW: u64 = 1_795_432_613;
/// The first queue ID (12 hex digits, as `QueueId` displays them).
const FIRST_ID: u64 = 0x7D3A_1F0C_9B2E;
/// The message as stored: exactly this many octets, before dot-stuffing.
const MESSAGE_SIZE: usize = 4096;

/// The settings of the MX listener with the configuration's defaults (estafeta's
/// `session_config` for port 25 with a certificate: STARTTLS offered, AUTH only after it).
fn config() -> SessionConfig {
    SessionConfig {
        hostname: HOSTNAME.into(),
        banner: BANNER.into(),
        max_message_size: 25 * 1024 * 1024,
        max_recipients: 100,
        max_errors: 10,
        max_received_headers: 50,
        vrfy: VrfyMode::Ambiguous,
        starttls: true,
        auth: AuthMode::AfterTls,
        require_auth: false,
        max_auth_failures: 3,
        check_sender: false,
        authenticated_header: false,
        expn_trusted: false,
        max_unknown_recipients: 5,
    }
}

/// What the client sends, round by round, and the message it stands for.
struct Workload {
    ehlo: Vec<u8>,
    /// MAIL, RCPT and DATA, pipelined.
    envelope: Vec<u8>,
    /// The dot-stuffed message and the final `.`.
    data: Vec<u8>,
    quit: Vec<u8>,
    /// The message as the session should hand it over (dot-stuffing undone).
    message: Vec<u8>,
}

impl Workload {
    fn new() -> Workload {
        let message = message(MESSAGE_SIZE);
        let mut data = Vec::with_capacity(message.len() + message.len() / 32 + 3);
        let mut line_start = true;
        for &b in &message {
            if line_start && b == b'.' {
                data.push(b'.');
            }
            data.push(b);
            line_start = b == b'\n';
        }
        data.extend_from_slice(b".\r\n");
        Workload {
            ehlo: b"EHLO client.example\r\n".to_vec(),
            envelope: format!(
                "MAIL FROM:<alice@client.example> SIZE={}\r\nRCPT TO:<bob@{LOCAL_DOMAIN}>\r\nDATA\r\n",
                message.len()
            )
            .into_bytes(),
            data,
            quit: b"QUIT\r\n".to_vec(),
            message,
        }
    }
}

/// A plain-text message of exactly `size` octets: a header section, then lines of up to 76
/// printable characters with CRLF; every eighth line starts with `.` (dot-stuffed on the
/// wire), one of them with `..`.
fn message(size: usize) -> Vec<u8> {
    let mut m = Vec::with_capacity(size);
    m.extend_from_slice(
        b"From: Alice <alice@client.example>\r\n\
          To: Bob <bob@example.org>\r\n\
          Subject: estafeta-hotpath fixed message\r\n\
          Date: Mon, 23 Nov 2026 11:16:50 +0000\r\n\
          Message-ID: <hotpath.1@client.example>\r\n\
          MIME-Version: 1.0\r\n\
          Content-Type: text/plain; charset=us-ascii\r\n\
          \r\n",
    );
    let mut line = 0usize;
    while m.len() < size {
        let room = size - m.len();
        // A line is at least 1 character and CRLF: leave no 1- or 2-octet tail.
        let len = match room {
            0..=2 => unreachable!("the previous line leaves 0 or at least 3 octets"),
            79..=80 => room - 2 - 3,
            _ => (room - 2).min(76),
        };
        for j in 0..len {
            let c = match (line % 8, line % 64, j) {
                (0, _, 0) => b'.',
                (_, 8, 1) => b'.',
                _ => b' ' + 1 + ((line * 7 + j) % 94) as u8,
            };
            m.push(c);
        }
        m.extend_from_slice(b"\r\n");
        line += 1;
    }
    debug_assert_eq!(m.len(), size);
    m
}

/// The driver: what the listener does around the session, in memory.
struct Driver {
    cfg: Arc<SessionConfig>,
    peer: SocketAddr,
    /// Replies not flushed yet (the listener's `out`).
    out: Vec<u8>,
    /// The next queue ID.
    next_id: u64,
    /// Messages stored, and their octets with the Received header.
    stored: u64,
    stored_bytes: u64,
    /// The last message stored (kept only for the first connection's check).
    last: Option<(String, Vec<u8>)>,
}

impl Driver {
    /// Feeds one read's bytes and runs the session until it needs more.
    fn round(&mut self, session: &mut Session, input: &[u8], keep: bool) {
        session.feed(input);
        self.drive(session, keep);
    }

    fn drive(&mut self, session: &mut Session, keep: bool) {
        while let Some(action) = session.poll() {
            match action {
                Action::Send(r) => r.write_to(&mut self.out),
                Action::CheckRcpt(rcpt) => {
                    let verdict = rcpt_verdict(&rcpt);
                    session.rcpt_checked(verdict);
                }
                Action::Enqueue(envelope, body) => {
                    let id = format!("{:012X}", self.next_id);
                    self.next_id += 1;
                    let received = received_header(HOSTNAME, &envelope, &id, NOW);
                    let mut content = Vec::with_capacity(received.len() + body.len());
                    content.extend_from_slice(received.as_bytes());
                    content.extend_from_slice(&body);
                    let content = black_box(content);
                    self.stored += 1;
                    self.stored_bytes += content.len() as u64;
                    if keep {
                        self.last = Some((id.clone(), content));
                    }
                    session.enqueued(Ok(id));
                }
                Action::Close => {}
                other => panic!("unexpected action in the fixed transaction: {other:?}"),
            }
        }
    }

    /// "Writes" the replies to the socket: the listener writes `out` and empties it.
    fn flush(&mut self) {
        black_box(&self.out);
        self.out.clear();
    }

    /// One connection, one message. `check` compares every reply and the stored message.
    fn connection(&mut self, w: &Workload, check: bool) {
        self.out = Vec::new();
        let mut session = Session::new(self.cfg.clone(), self.peer);
        session.set_client_name(Some(CLIENT_NAME.into()));
        let stored = self.stored;

        self.drive(&mut session, check);
        expect(check, &self.out, &[reply::greeting(HOSTNAME, BANNER)]);
        self.flush();

        self.round(&mut session, &w.ehlo, check);
        if check {
            let ehlo = String::from_utf8_lossy(&self.out);
            assert!(
                ehlo.starts_with(&format!("250-{HOSTNAME}\r\n250-PIPELINING\r\n"))
                    && ehlo.contains("\r\n250-STARTTLS\r\n")
                    && ehlo.ends_with("\r\n250 CHUNKING\r\n"),
                "EHLO reply: {ehlo:?}"
            );
        }
        self.flush();

        self.round(&mut session, &w.envelope, check);
        expect(
            check,
            &self.out,
            &[reply::mail_ok(), reply::rcpt_ok(), reply::start_data()],
        );
        self.flush();

        self.round(&mut session, &w.data, check);
        if check {
            let (id, content) = self.last.take().expect("the message was stored");
            expect(true, &self.out, &[reply::queued(&id)]);
            let expected_header = format!(
                "Received: from client.example ({CLIENT_NAME} [192.0.2.9])\r\n\
                 \tby {HOSTNAME} (estafeta) with ESMTP id {id}\r\n\
                 \tfor <bob@{LOCAL_DOMAIN}>; Mon, 23 Nov 2026 11:16:53 +0000\r\n"
            );
            let mut expected = expected_header.into_bytes();
            expected.extend_from_slice(&w.message);
            assert!(content == expected, "stored content differs");
        }
        self.flush();

        self.round(&mut session, &w.quit, check);
        expect(check, &self.out, &[reply::bye()]);
        self.flush();

        assert!(
            session.is_closed() && self.stored == stored + 1,
            "the connection did not end with its message stored"
        );
    }
}

/// The recipient check: the policy's answer for a domain it serves, or relaying denied.
fn rcpt_verdict(rcpt: &Recipient) -> Result<(), Reply> {
    if rcpt.path.mailbox.domain.key() == LOCAL_DOMAIN {
        Ok(())
    } else {
        Err(reply::relay_denied(&rcpt.path.to_string()))
    }
}

fn expect(check: bool, got: &[u8], replies: &[Reply]) {
    if !check {
        return;
    }
    let mut want = Vec::new();
    for r in replies {
        r.write_to(&mut want);
    }
    assert!(
        got == want.as_slice(),
        "replies {:?}, expected {:?}",
        String::from_utf8_lossy(got),
        String::from_utf8_lossy(&want)
    );
}

impl Driver {
    fn new() -> Driver {
        Driver {
            cfg: Arc::new(config()),
            peer: SocketAddr::from(([192, 0, 2, 9], 40000)),
            out: Vec::new(),
            next_id: FIRST_ID,
            stored: 0,
            stored_bytes: 0,
            last: None,
        }
    }
}

fn main() {
    let n: u64 = match std::env::args().nth(1) {
        None => 1000,
        Some(a) => match a.parse() {
            Ok(n) => n,
            Err(_) => {
                eprintln!("usage: estafeta-hotpath [MESSAGES]");
                std::process::exit(2);
            }
        },
    };
    let workload = Workload::new();
    let mut driver = Driver::new();
    for i in 0..n {
        driver.connection(&workload, i == 0);
    }
    println!(
        "estafeta-hotpath: {} messages ({} octets stored)",
        driver.stored, driver.stored_bytes
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_message_is_4_kib_with_dot_stuffed_lines() {
        let w = Workload::new();
        assert_eq!(w.message.len(), MESSAGE_SIZE);
        assert!(w.message.ends_with(b"\r\n"));
        let stuffed = w.data.windows(3).filter(|l| l == b"\n..").count();
        assert!(stuffed >= 5, "{stuffed} dot-stuffed lines");
        assert!(w.data.windows(4).any(|l| l == b"\n..."));
        assert!(w.data.ends_with(b"\r\n.\r\n"));
    }

    #[test]
    fn the_fixed_transaction_is_answered_as_expected() {
        let w = Workload::new();
        let mut d = Driver::new();
        d.connection(&w, true);
        d.connection(&w, false);
        d.connection(&w, true);
        assert_eq!(d.stored, 3);
    }
}
