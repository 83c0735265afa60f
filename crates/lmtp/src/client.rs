//! [`Lmtp`]: the client shared by concurrent deliveries, with its pool of idle sessions and
//! its cache of verification answers.

use std::sync::Mutex;
use std::time::Duration;

use estafeta_proto::reply as replies;
use estafeta_proto::{MailParams, RcptParams};
use estafeta_queue::{Failure, Outcome};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::{Instant, timeout};

use crate::cache::{CacheLimits, VerifyCache};
use crate::session::Session;
use crate::wire::Verification;
use crate::{Address, Timeouts};

/// A stream the pool can hold: a Unix socket or TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Pooled = Session<Box<dyn Io>>;

/// How many idle sessions are kept, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolLimits {
    /// The most idle sessions kept (4). More are closed with QUIT when they finish.
    pub idle: usize,
    /// How long a session may stay idle before it is closed instead of used (30 s; Postfix's
    /// connection cache keeps them 2 s, Dovecot's LMTP server waits minutes).
    pub idle_time: Duration,
}

impl Default for PoolLimits {
    fn default() -> Self {
        PoolLimits {
            idle: 4,
            idle_time: Duration::from_secs(30),
        }
    }
}

/// An LMTP client for one server, shared by concurrent deliveries (it is `Send + Sync`).
///
/// Each [`deliver`](Lmtp::deliver) and [`verify`](Lmtp::verify) takes an idle session from
/// the pool (RSET first; a session the server closed meanwhile is dropped and another
/// tried) or opens a new one (greeting, LHLO), and puts it back afterwards while it is
/// usable.
pub struct Lmtp {
    address: Address,
    /// `address` as text, for [`Failure::remote`] and logs.
    remote: String,
    lhlo_name: String,
    timeouts: Timeouts,
    limits: PoolLimits,
    idle: Mutex<Vec<(Pooled, Instant)>>,
    cache: Mutex<VerifyCache>,
}

impl std::fmt::Debug for Lmtp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lmtp")
            .field("address", &self.remote)
            .field("lhlo_name", &self.lhlo_name)
            .field("timeouts", &self.timeouts)
            .field("limits", &self.limits)
            .finish()
    }
}

impl Lmtp {
    /// A client for the server at `address`, presenting itself as `lhlo_name` (this host's
    /// name), with the default pool ([`PoolLimits`]) and cache ([`CacheLimits`]).
    pub fn new(address: Address, lhlo_name: String, timeouts: Timeouts) -> Self {
        Self::with_limits(
            address,
            lhlo_name,
            timeouts,
            PoolLimits::default(),
            CacheLimits::default(),
        )
    }

    /// A client with its own pool and cache limits.
    pub fn with_limits(
        address: Address,
        lhlo_name: String,
        timeouts: Timeouts,
        pool: PoolLimits,
        cache: CacheLimits,
    ) -> Self {
        Lmtp {
            remote: address.to_string(),
            address,
            lhlo_name,
            timeouts,
            limits: pool,
            idle: Mutex::new(Vec::new()),
            cache: Mutex::new(VerifyCache::new(cache)),
        }
    }

    /// The server's address.
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// Delivers one message to `rcpts` (addresses without `<>`, with their RCPT
    /// parameters) from `from` (without `<>`; empty for the null sender) and returns one
    /// [`Outcome`] per recipient, in order: the RCPT reply for a refused recipient, the
    /// server's own reply after the data for each accepted one (RFC 2033 §4.2). `content`
    /// is the message as spooled (CRLF lines, not dot-stuffed).
    ///
    /// A server that cannot be reached, times out or breaks the protocol gives every
    /// recipient still unanswered a temporary failure: a local transport problem never
    /// bounces.
    pub async fn deliver(
        &self,
        from: &str,
        params: &MailParams,
        rcpts: &[(String, RcptParams)],
        content: &[u8],
    ) -> Vec<Outcome> {
        if rcpts.is_empty() {
            return Vec::new();
        }
        let mut session = match self.checkout().await {
            Ok(s) => s,
            Err(failure) => {
                tracing::info!(server = %self.remote, error = %failure, "LMTP server unavailable");
                return vec![Outcome::TempFail(failure); rcpts.len()];
            }
        };
        let (outcomes, usable) = session.deliver(from, params, rcpts, content).await;
        self.checkin(session, usable).await;
        outcomes
    }

    /// Asks the server whether `rcpt` (without `<>`) exists, with `MAIL FROM:<>`,
    /// `RCPT TO:<rcpt>` and `RSET` on a pooled session: for refusing unknown users during
    /// the SMTP session instead of bouncing later (no backscatter). Answers are cached
    /// ([`CacheLimits`]: [`Verification::Exists`] 10 min, [`Verification::Unknown`] 1 min,
    /// [`Verification::Unavailable`] not at all).
    pub async fn verify(&self, rcpt: &str) -> Verification {
        let now = Instant::now().into_std();
        if let Some(answer) = lock(&self.cache).get(rcpt, now) {
            return answer;
        }
        let mut session = match self.checkout().await {
            Ok(s) => s,
            Err(failure) => return Verification::Unavailable(failure.reply),
        };
        let (answer, usable) = session.probe(rcpt).await;
        self.checkin(session, usable).await;
        tracing::debug!(server = %self.remote, rcpt, ?answer, "LMTP verification");
        lock(&self.cache).put(rcpt, &answer, Instant::now().into_std());
        answer
    }

    /// Closes every idle session (QUIT), for a clean shutdown.
    pub async fn close_idle(&self) {
        let idle: Vec<_> = std::mem::take(&mut *lock(&self.idle));
        for (session, _) in idle {
            session.quit().await;
        }
    }

    /// An idle session that answered RSET, or a new one.
    async fn checkout(&self) -> Result<Pooled, Failure> {
        // Bounded: each turn removes one session from the pool.
        loop {
            let next = {
                let mut idle = lock(&self.idle);
                let now = Instant::now();
                idle.retain(|(_, since)| now.duration_since(*since) < self.limits.idle_time);
                idle.pop()
            };
            let Some((mut session, _)) = next else {
                break;
            };
            match session.rset().await {
                Ok(()) => {
                    tracing::trace!(server = %self.remote, "reusing an idle LMTP session");
                    return Ok(session);
                }
                Err(failure) => {
                    // Not the message's problem: the server closed an idle session.
                    tracing::debug!(server = %self.remote, error = %failure, "idle LMTP session gone; dropping it");
                }
            }
        }
        self.open().await
    }

    /// Puts a finished session back into the pool (when it is usable and there is room).
    async fn checkin(&self, session: Pooled, usable: bool) {
        if !usable {
            return;
        }
        let overflow = {
            let mut idle = lock(&self.idle);
            if idle.len() < self.limits.idle {
                idle.push((session, Instant::now()));
                None
            } else {
                Some(session)
            }
        };
        if let Some(session) = overflow {
            session.quit().await;
        }
    }

    /// Connects and starts a session (greeting, LHLO).
    async fn open(&self) -> Result<Pooled, Failure> {
        let peer = format!("LMTP server {}", self.remote);
        let connect = async {
            Ok::<Box<dyn Io>, std::io::Error>(match &self.address {
                Address::Unix(path) => Box::new(UnixStream::connect(path).await?),
                Address::Inet { host, port } => {
                    let tcp = TcpStream::connect((host.as_str(), *port)).await?;
                    let _ = tcp.set_nodelay(true);
                    Box::new(tcp)
                }
            })
        };
        let stream = match timeout(self.timeouts.connect, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                return Err(Failure::local(replies::connect_failed(
                    &peer,
                    &e.to_string(),
                )));
            }
            Err(_) => return Err(Failure::local(replies::connect_failed(&peer, "timed out"))),
        };
        tracing::debug!(server = %self.remote, "LMTP connection opened");
        Session::start(stream, &self.lhlo_name, &self.remote, self.timeouts).await
    }
}

/// Locks a mutex, going on after a panic elsewhere (the data stays consistent: every
/// critical section is a single push, pop or map operation).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>(_: &T) {}

    #[test]
    fn shared_and_its_futures_are_send() {
        assert_send_sync::<Lmtp>();
        let lmtp = Lmtp::new(
            "unix:/nonexistent/lmtp".parse().unwrap(),
            "mx.example".into(),
            Timeouts::default(),
        );
        let params = MailParams::default();
        let deliver = lmtp.deliver("", &params, &[], b"");
        assert_send(&deliver);
        let verify = lmtp.verify("a@b");
        assert_send(&verify);
    }

    #[tokio::test]
    async fn dead_address_fails_every_recipient_temporarily() {
        let lmtp = Lmtp::new(
            "unix:/nonexistent/estafeta-test/lmtp".parse().unwrap(),
            "mx.example".into(),
            Timeouts::default(),
        );
        let rcpts = vec![
            ("a@d".to_string(), RcptParams::default()),
            ("b@d".to_string(), RcptParams::default()),
        ];
        let out = lmtp
            .deliver("s@d", &MailParams::default(), &rcpts, b"x\r\n")
            .await;
        assert_eq!(out.len(), 2);
        for o in &out {
            let Outcome::TempFail(f) = o else {
                panic!("{o:?}")
            };
            assert_eq!(f.reply.code, 451);
            assert!(
                f.reply
                    .text()
                    .contains("LMTP server unix:/nonexistent/estafeta-test/lmtp"),
                "{f}"
            );
        }
        assert!(matches!(
            lmtp.verify("a@d").await,
            Verification::Unavailable(_)
        ));
        assert!(
            lmtp.deliver("", &MailParams::default(), &[], b"")
                .await
                .is_empty()
        );
    }
}
