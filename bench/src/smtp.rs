//! A minimal, allocation-free-per-reply SMTP client connection.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::time::timeout;

/// Longest reply line accepted (RFC 5321 says 512; be generous).
const MAX_LINE: u64 = 4096;
/// Most lines accepted in one multi-line reply.
const MAX_LINES: usize = 256;

/// Class of a reply code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Ok,
    Intermediate,
    Temp,
    Perm,
    Other,
}

pub fn class(code: u16) -> Class {
    match code / 100 {
        2 => Class::Ok,
        3 => Class::Intermediate,
        4 => Class::Temp,
        5 => Class::Perm,
        _ => Class::Other,
    }
}

pub fn protocol_error(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, format!("timeout {what}"))
}

pub struct Conn {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    line: Vec<u8>,
    timeout: Duration,
    /// Server advertised PIPELINING in its EHLO reply.
    pub pipelining: bool,
    /// Server advertised SIZE in its EHLO reply.
    pub size: bool,
}

impl Conn {
    /// Connects (bounded by `timeout`); does not read the greeting.
    pub async fn connect(addr: SocketAddr, timeout_: Duration, buf: usize) -> io::Result<Conn> {
        let stream = match timeout(timeout_, TcpStream::connect(addr)).await {
            Ok(r) => r?,
            Err(_) => return Err(timed_out("connecting")),
        };
        stream.set_nodelay(true)?;
        let (r, w) = stream.into_split();
        Ok(Conn {
            reader: BufReader::with_capacity(buf, r),
            writer: w,
            line: Vec::with_capacity(128),
            timeout: timeout_,
            pipelining: false,
            size: false,
        })
    }

    /// Writes all of `data` (bounded by the timeout).
    pub async fn send(&mut self, data: &[u8]) -> io::Result<()> {
        match timeout(self.timeout, self.writer.write_all(data)).await {
            Ok(r) => r,
            Err(_) => Err(timed_out("writing")),
        }
    }

    /// Reads one (possibly multi-line) reply and returns its code.
    pub async fn reply(&mut self) -> io::Result<u16> {
        self.reply_inner(false).await
    }

    /// Reads the EHLO reply, noting the PIPELINING and SIZE extensions.
    pub async fn ehlo_reply(&mut self) -> io::Result<u16> {
        self.pipelining = false;
        self.size = false;
        self.reply_inner(true).await
    }

    async fn reply_inner(&mut self, ehlo: bool) -> io::Result<u16> {
        match timeout(self.timeout, self.read_reply(ehlo)).await {
            Ok(r) => r,
            Err(_) => Err(timed_out("waiting for a reply")),
        }
    }

    async fn read_reply(&mut self, ehlo: bool) -> io::Result<u16> {
        for _ in 0..MAX_LINES {
            self.line.clear();
            let n = (&mut self.reader)
                .take(MAX_LINE)
                .read_until(b'\n', &mut self.line)
                .await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed by server",
                ));
            }
            if self.line.last() != Some(&b'\n') {
                return Err(protocol_error("reply line too long".into()));
            }
            let line = trim_eol(&self.line);
            let code = parse_code(line).ok_or_else(|| {
                protocol_error(format!(
                    "malformed reply line {:?}",
                    String::from_utf8_lossy(line)
                ))
            })?;
            if ehlo && line.len() > 4 {
                let keyword = line[4..].split(|&b| b == b' ').next().unwrap_or(&[]);
                if keyword.eq_ignore_ascii_case(b"PIPELINING") {
                    self.pipelining = true;
                } else if keyword.eq_ignore_ascii_case(b"SIZE") {
                    self.size = true;
                }
            }
            if line.get(3) != Some(&b'-') {
                return Ok(code);
            }
        }
        Err(protocol_error("reply has too many lines".into()))
    }

    /// Sends QUIT and waits for the reply; returns its code.
    pub async fn quit(&mut self) -> io::Result<u16> {
        self.send(b"QUIT\r\n").await?;
        self.reply().await
    }
}

fn trim_eol(mut line: &[u8]) -> &[u8] {
    while let [rest @ .., b'\r' | b'\n'] = line {
        line = rest;
    }
    line
}

fn parse_code(line: &[u8]) -> Option<u16> {
    if line.len() < 3 || !line[..3].iter().all(u8::is_ascii_digit) {
        return None;
    }
    match line.get(3) {
        None | Some(b' ') | Some(b'-') => {}
        _ => return None,
    }
    Some(
        line[..3]
            .iter()
            .fold(0u16, |a, &d| a * 10 + u16::from(d - b'0')),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        assert_eq!(parse_code(b"250 ok"), Some(250));
        assert_eq!(parse_code(b"250-PIPELINING"), Some(250));
        assert_eq!(parse_code(b"354"), Some(354));
        assert_eq!(parse_code(b"25x ok"), None);
        assert_eq!(parse_code(b"2500"), None);
        assert_eq!(trim_eol(b"250 ok\r\n"), b"250 ok");
        assert_eq!(class(421), Class::Temp);
    }
}
