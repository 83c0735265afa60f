//! The LMTP client (RFC 2033): local delivery into Dovecot or another LMTP server, with one
//! reply per recipient after the data.
//!
//! [`Lmtp`] is shared by concurrent deliveries. It keeps a small pool of idle sessions
//! ([`PoolLimits`]), runs LHLO, MAIL, RCPT for each recipient, DATA with the content
//! dot-stuffed by [`estafeta_proto::data::stuff`], and reads one reply per accepted
//! recipient after the final dot, each becoming that recipient's [`Outcome`] by the one
//! classification, [`classify`]. [`Lmtp::verify`] asks the server whether a recipient
//! exists, for refusing unknown users during the SMTP session; its answers are cached
//! ([`CacheLimits`]).
//!
//! Layout: `wire` is sans-IO (LHLO keywords, command lines, reply assembly with its limits,
//! classification, the per-recipient bookkeeping of a transaction); `session` drives it over
//! any byte stream with timed waits; `client` holds the pool and the cache. See
//! `docs/lmtp.md`.
//!
//! [`Outcome`]: estafeta_queue::Outcome

mod address;
mod cache;
mod client;
mod session;
mod wire;

use std::time::Duration;

pub use address::{Address, AddressError};
pub use cache::CacheLimits;
pub use client::{Lmtp, PoolLimits};
pub use wire::{MAX_REPLY_LINE, MAX_REPLY_LINES, Verification, classify};

/// How long to wait for each step; when one runs out, every recipient still unanswered gets
/// a temporary failure. The defaults are Postfix's `lmtp_*_timeout` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// Connecting (Postfix `lmtp_connect_timeout`, 30 s).
    pub connect: Duration,
    /// The greeting, LHLO, RSET, MAIL, each RCPT, DATA, and writing each 64 KiB block of the
    /// content (Postfix `lmtp_lhlo_timeout`, `lmtp_mail_timeout`, `lmtp_rcpt_timeout`:
    /// 5 min).
    pub command: Duration,
    /// Each reply after the final dot (Postfix `lmtp_data_done_timeout`, 10 min): the
    /// server delivers (and runs Sieve) before answering.
    pub data_end: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(30),
            command: Duration::from_secs(300),
            data_end: Duration::from_secs(600),
        }
    }
}

impl Timeouts {
    /// Every timeout set to `d` (for tests).
    pub fn all(d: Duration) -> Self {
        Timeouts {
            connect: d,
            command: d,
            data_end: d,
        }
    }
}
