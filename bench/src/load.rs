//! The message load: `sessions` tasks, each opening connections and sending messages until the
//! shared message counter reaches `messages`. Every message number is claimed exactly once and
//! ends as accepted, temporarily rejected, permanently rejected or an error, so the run is
//! bounded by the message count; every network operation is bounded by the timeout.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::message::Template;
use crate::smtp::{Class, Conn, class, protocol_error};

pub struct Params {
    pub addr: SocketAddr,
    pub sessions: usize,
    pub messages: u64,
    pub size: usize,
    pub per_connection: u64,
    pub pipelining: bool,
    pub helo: String,
    pub from: String,
    pub rcpt: String,
    pub mailboxes: u64,
    pub timeout: Duration,
}

#[derive(Default)]
pub struct Stats {
    pub accepted: u64,
    pub temp: u64,
    pub perm: u64,
    pub errors: u64,
    pub connections: u64,
    /// End-of-data to reply, in nanoseconds, one per accepted message.
    pub latencies: Vec<u64>,
    /// A few error messages, to tell what went wrong.
    pub error_samples: Vec<String>,
    /// Some server did not advertise PIPELINING although it was asked for.
    pub pipelining_unavailable: bool,
}

impl Stats {
    fn error(&mut self, e: &io::Error) {
        self.errors += 1;
        if self.error_samples.len() < 3 {
            let s = e.to_string();
            if !self.error_samples.contains(&s) {
                self.error_samples.push(s);
            }
        }
    }

    fn rejected(&mut self, code: u16) {
        if class(code) == Class::Temp {
            self.temp += 1;
        } else {
            self.perm += 1;
        }
    }

    fn merge(&mut self, o: Stats) {
        self.accepted += o.accepted;
        self.temp += o.temp;
        self.perm += o.perm;
        self.errors += o.errors;
        self.connections += o.connections;
        self.latencies.extend(o.latencies);
        for s in o.error_samples {
            if self.error_samples.len() < 3 && !self.error_samples.contains(&s) {
                self.error_samples.push(s);
            }
        }
        self.pipelining_unavailable |= o.pipelining_unavailable;
    }
}

pub struct Outcome {
    pub stats: Stats,
    /// From the first connect to the end of the last session.
    pub elapsed: Duration,
    pub message_size: usize,
}

pub async fn run(p: Params) -> Outcome {
    let p = Arc::new(p);
    let next = Arc::new(AtomicU64::new(0));
    let message_size = Template::new(p.size, &p.from).size;
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(p.sessions);
    for _ in 0..p.sessions {
        let p = Arc::clone(&p);
        let next = Arc::clone(&next);
        tasks.push(tokio::spawn(async move { session(&p, &next).await }));
    }
    let mut stats = Stats {
        latencies: Vec::with_capacity(p.messages as usize),
        ..Stats::default()
    };
    for t in tasks {
        match t.await {
            Ok(s) => stats.merge(s),
            Err(e) => stats.error(&io::Error::other(e)),
        }
    }
    Outcome {
        stats,
        elapsed: start.elapsed(),
        message_size,
    }
}

enum Sent {
    Accepted(Duration),
    Rejected(u16),
}

/// Per-session reusable state.
struct Session<'a> {
    p: &'a Params,
    template: Template,
    cmd: Vec<u8>,
    rcpt_prefix: &'a str,
    rcpt_suffix: Option<&'a str>,
}

async fn session(p: &Params, next: &AtomicU64) -> Stats {
    let (rcpt_prefix, rcpt_suffix) = match p.rcpt.split_once("{n}") {
        Some((a, b)) => (a, Some(b)),
        None => (p.rcpt.as_str(), None),
    };
    let mut s = Session {
        p,
        template: Template::new(p.size, &p.from),
        cmd: Vec::with_capacity(256),
        rcpt_prefix,
        rcpt_suffix,
    };
    let mut st = Stats::default();
    let claim = || {
        let n = next.fetch_add(1, Ordering::Relaxed);
        (n < p.messages).then_some(n)
    };
    while let Some(first) = claim() {
        st.connections += 1;
        let mut conn = match open(p).await {
            Ok(Ok(c)) => c,
            Ok(Err(code)) => {
                st.rejected(code);
                continue;
            }
            Err(e) => {
                st.error(&e);
                continue;
            }
        };
        if p.pipelining && !conn.pipelining {
            st.pipelining_unavailable = true;
        }
        let mut n = first;
        let mut sent = 0;
        let usable = loop {
            sent += 1;
            match s.message(&mut conn, n).await {
                Ok(Sent::Accepted(lat)) => {
                    st.accepted += 1;
                    st.latencies.push(lat.as_nanos() as u64);
                }
                Ok(Sent::Rejected(code)) => {
                    st.rejected(code);
                    // 421: the server closes the connection. Otherwise reset the transaction.
                    if code == 421 || !rset(&mut conn).await {
                        break false;
                    }
                }
                Err(e) => {
                    st.error(&e);
                    break false;
                }
            }
            if sent >= p.per_connection {
                break true;
            }
            match claim() {
                Some(m) => n = m,
                None => break true,
            }
        };
        if usable {
            let _ = conn.quit().await;
        }
    }
    st
}

/// Connects, reads the greeting and says EHLO (HELO if EHLO is refused). `Ok(Err(code))` is a
/// refusal by the server.
async fn open(p: &Params) -> io::Result<Result<Conn, u16>> {
    let mut conn = Conn::connect(p.addr, p.timeout, 8192).await?;
    let code = conn.reply().await?;
    if class(code) != Class::Ok {
        return refused(code);
    }
    conn.send(format!("EHLO {}\r\n", p.helo).as_bytes()).await?;
    let code = conn.ehlo_reply().await?;
    if class(code) == Class::Perm && code != 554 {
        conn.send(format!("HELO {}\r\n", p.helo).as_bytes()).await?;
        let code = conn.reply().await?;
        if class(code) != Class::Ok {
            return refused(code);
        }
    } else if class(code) != Class::Ok {
        return refused(code);
    }
    Ok(Ok(conn))
}

fn refused(code: u16) -> io::Result<Result<Conn, u16>> {
    match class(code) {
        Class::Temp | Class::Perm => Ok(Err(code)),
        _ => Err(protocol_error(format!("unexpected reply {code}"))),
    }
}

async fn rset(conn: &mut Conn) -> bool {
    conn.send(b"RSET\r\n").await.is_ok()
        && matches!(conn.reply().await, Ok(c) if class(c) == Class::Ok)
}

impl Session<'_> {
    fn push_mail(&mut self, conn: &Conn) {
        self.cmd.extend_from_slice(b"MAIL FROM:<");
        self.cmd.extend_from_slice(self.p.from.as_bytes());
        self.cmd.push(b'>');
        if conn.size {
            self.cmd
                .extend_from_slice(format!(" SIZE={}", self.template.size).as_bytes());
        }
        self.cmd.extend_from_slice(b"\r\n");
    }

    fn push_rcpt(&mut self, n: u64) {
        self.cmd.extend_from_slice(b"RCPT TO:<");
        self.cmd.extend_from_slice(self.rcpt_prefix.as_bytes());
        if let Some(suffix) = self.rcpt_suffix {
            let mailbox = n % self.p.mailboxes.max(1);
            self.cmd.extend_from_slice(mailbox.to_string().as_bytes());
            self.cmd.extend_from_slice(suffix.as_bytes());
        }
        self.cmd.extend_from_slice(b">\r\n");
    }

    /// One transaction: MAIL, RCPT, DATA (pipelined when possible), body, final dot.
    async fn message(&mut self, conn: &mut Conn, n: u64) -> io::Result<Sent> {
        self.template.set_number(n);
        let (mail, rcpt, data);
        self.cmd.clear();
        if self.p.pipelining && conn.pipelining {
            self.push_mail(conn);
            self.push_rcpt(n);
            self.cmd.extend_from_slice(b"DATA\r\n");
            conn.send(&self.cmd).await?;
            mail = conn.reply().await?;
            rcpt = conn.reply().await?;
            data = conn.reply().await?;
        } else {
            self.push_mail(conn);
            conn.send(&self.cmd).await?;
            mail = conn.reply().await?;
            if class(mail) != Class::Ok {
                return rejection(mail);
            }
            self.cmd.clear();
            self.push_rcpt(n);
            conn.send(&self.cmd).await?;
            rcpt = conn.reply().await?;
            if class(rcpt) != Class::Ok {
                return rejection(rcpt);
            }
            conn.send(b"DATA\r\n").await?;
            data = conn.reply().await?;
        }
        let earlier = [mail, rcpt].into_iter().find(|&c| class(c) != Class::Ok);
        if data != 354 {
            return rejection(earlier.unwrap_or(data));
        }
        if let Some(code) = earlier {
            // DATA accepted although the transaction failed: send an empty message.
            conn.send(b".\r\n").await?;
            conn.reply().await?;
            return rejection(code);
        }
        conn.send(&self.template.wire).await?;
        let t = Instant::now();
        let code = conn.reply().await?;
        let latency = t.elapsed();
        if class(code) == Class::Ok {
            Ok(Sent::Accepted(latency))
        } else {
            rejection(code)
        }
    }
}

fn rejection(code: u16) -> io::Result<Sent> {
    match class(code) {
        Class::Temp | Class::Perm => Ok(Sent::Rejected(code)),
        _ => Err(protocol_error(format!("unexpected reply {code}"))),
    }
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::percentile;

    #[test]
    fn percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&[7], 90.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }
}
