//! estafeta-listener: the network side of SMTP.
//!
//! Accept loops with connection caps (global and per client address), one task per
//! connection driving a sans-IO [`Session`]: bytes in, actions out, answered with the policy
//! and the queue. Inactivity timeouts per RFC 5321 §4.5.3.2, and a graceful stop.
//!
//! Besides TCP, the local submission socket (`[control] submit_socket`, what `sendmail`
//! talks to): a Unix stream socket whose sessions are the same SMTP sessions, driven by the
//! same loop, without STARTTLS or AUTH; the user is the one the kernel reports for the peer
//! (SO_PEERCRED), trusted like mynetworks and named in the Received header.

pub mod tls;

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use estafeta_config::ListenerKind;
pub mod milters;
pub mod rates;

use estafeta_mailauth::MailAuth;
use estafeta_mailauth::verify::SpfResults;
use estafeta_policy::{Client, Policy, Trust, Verdict};
use estafeta_proto::reply::{self, Reply};
use estafeta_proto::{Action, SaslAnswer, Session, SessionConfig, Timeout};
use estafeta_queue::{MessageBody, QueueHandle, SpillWriter, Spilled};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What every session shares. Deliberately narrow: the recipient policy, the queue handle,
/// TLS and authentication, limits; nothing else.
#[derive(Debug)]
pub struct ListenerContext {
    /// The recipient policy.
    pub policy: Arc<Policy>,
    /// Where accepted messages go.
    pub queue: QueueHandle,
    /// The certificate for STARTTLS and implicit TLS, when there is one.
    pub tls: Option<Arc<tls::Tls>>,
    /// Password checks and the brute-force throttle, when AUTH is offered.
    pub auth: Option<Arc<AuthContext>>,
    /// Waiting for a command.
    pub command_timeout: Duration,
    /// Waiting for message content.
    pub data_timeout: Duration,
    /// Connections at once, in total.
    pub max_connections: usize,
    /// Connections at once from one client address.
    pub max_connections_per_ip: usize,
    /// Set when the configuration allows an open relay (`allow_open_relay = true` with public
    /// ranges in `mynetworks`): logged at the start of every session.
    pub open_relay: Option<String>,
    /// The session settings of each listener kind.
    pub sessions: HashMap<ListenerKind, Arc<SessionConfig>>,
    /// The session settings of the local submission socket: no STARTTLS, no AUTH, no sender
    /// check.
    pub local_session: Arc<SessionConfig>,
    /// DKIM signing, the inbound checks, reverse DNS names and SRS.
    pub mail_auth: Arc<MailAuth>,
    /// smtp listeners, clients outside mynetworks: the wait before the greeting.
    pub greet_delay: Duration,
    /// Connection, message and recipient rates.
    pub rates: Arc<rates::Rates>,
    /// The LMTP servers of domains delivered over LMTP, by server as configured: recipients
    /// of such a domain with `mailboxes = "*"` are verified live against it at RCPT.
    pub lmtp: Arc<HashMap<String, Arc<estafeta_lmtp::Lmtp>>>,
    /// The mail filters (`[[milter]]`), in order.
    pub milters: Vec<Arc<milters::MilterSpec>>,
}

/// The context new sessions start with. A reload stores a new one; sessions already open
/// keep the one they started with (an `Arc`), new connections get the new one.
#[derive(Debug)]
pub struct Live {
    ctx: RwLock<Arc<ListenerContext>>,
    /// Connections being served (for `systemctl status`).
    active: std::sync::atomic::AtomicUsize,
}

impl Live {
    /// A live context starting with `ctx`.
    pub fn new(ctx: ListenerContext) -> Live {
        Live {
            ctx: RwLock::new(Arc::new(ctx)),
            active: Default::default(),
        }
    }

    /// The current context.
    pub fn load(&self) -> Arc<ListenerContext> {
        self.ctx.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the context for the sessions that start from now on.
    pub fn store(&self, ctx: ListenerContext) {
        *self.ctx.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(ctx);
    }

    /// Connections being served right now.
    pub fn active_connections(&self) -> usize {
        self.active.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Counts a connection in [`Live::active_connections`] while it lives.
struct Active(Arc<Live>);

impl Active {
    fn new(live: &Arc<Live>) -> Active {
        live.active
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Active(live.clone())
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0
            .active
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// What AUTH needs: the verifier (argon2 on the blocking pool) and the per-address throttle.
#[derive(Debug)]
pub struct AuthContext {
    /// Checks passwords against the users file.
    pub verifier: estafeta_auth::Verifier,
    /// Slows down addresses that keep failing.
    pub throttle: estafeta_auth::Throttle,
    /// The fixed delay before a `535` (so that failures all take the same time).
    pub failure_delay: Duration,
}

/// One listening socket with the way its sessions run.
#[derive(Debug)]
pub struct ListenerSpec {
    /// The bound socket.
    pub listener: TcpListener,
    /// What it serves: the session settings of this kind come from the live context, and
    /// `submissions` is TLS from the first byte (port 465, RFC 8314 §3.3).
    pub kind: ListenerKind,
}

/// The local submission socket, bound, with the way its sessions run.
#[derive(Debug)]
pub struct LocalSpec {
    /// The bound Unix socket (mode 0666: every local user may submit).
    pub listener: UnixListener,
    /// Its path, removed when the accept loop stops.
    pub path: PathBuf,
}

/// A local user on the submit socket, as the kernel reports it (SO_PEERCRED).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalPeer {
    /// The peer's user ID.
    pub uid: u32,
    /// The peer's process ID, when the kernel gives it.
    pub pid: Option<i32>,
    /// The login name of `uid`, when the user database has one.
    pub user: Option<String>,
}

/// The other end of a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    /// A client over TCP.
    Tcp(SocketAddr),
    /// A local user on the submit socket.
    Local(LocalPeer),
}

impl Peer {
    /// The address the policy judges: the client's, or 127.0.0.1 for a local user (who is
    /// trusted by uid, not by address).
    pub fn ip(&self) -> IpAddr {
        match self {
            Peer::Tcp(a) => a.ip(),
            Peer::Local(_) => Ipv4Addr::LOCALHOST.into(),
        }
    }

    /// The uid of a local user.
    pub fn local_uid(&self) -> Option<u32> {
        match self {
            Peer::Tcp(_) => None,
            Peer::Local(l) => Some(l.uid),
        }
    }

    /// What the policy knows about this peer in `session`.
    fn client(&self, session: &Session) -> Client {
        Client {
            ip: self.ip(),
            user: session.auth_user().map(str::to_string),
            local_uid: self.local_uid(),
        }
    }
}

impl std::fmt::Display for Peer {
    /// `client=` in the maillog: the IP address, or `local`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(a) => a.ip().fmt(f),
            Peer::Local(_) => f.write_str("local"),
        }
    }
}

/// Binds a listening socket. IPv6 sockets are IPv6-only, so that `0.0.0.0:25` and `[::]:25`
/// can both be bound; SO_REUSEADDR lets a restarted server bind at once.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let domain = if addr.is_ipv6() {
        Domain::IPV6
    } else {
        Domain::IPV4
    };
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// What the per-client cap counts: a client address, or a local user.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum PeerKey {
    Ip(IpAddr),
    Uid(u32),
}

/// Counts connections per client address (and per local user).
#[derive(Debug, Default)]
struct PerIp {
    counts: Mutex<HashMap<PeerKey, usize>>,
}

/// Decrements the per-address count when the connection ends.
struct IpSlot {
    table: Arc<PerIp>,
    key: PeerKey,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = counts.get_mut(&self.key) {
            *c -= 1;
            if *c == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

impl PerIp {
    fn acquire(self: &Arc<Self>, key: PeerKey, max: usize) -> Option<IpSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let c = counts.entry(key).or_insert(0);
        if *c >= max {
            return None;
        }
        *c += 1;
        Some(IpSlot {
            table: self.clone(),
            key,
        })
    }
}

/// Runs the accept loops of `listeners` (and of the local submission socket, when there is
/// one) until `shutdown`; connection tasks are spawned on `tracker` so that the caller can
/// wait for them. Each connection takes the context current when it is accepted; the
/// connection caps are shared by all of them (the total one is the first context's); a local
/// user counts as one client address.
pub fn spawn_accept_loops(
    specs: Vec<ListenerSpec>,
    local: Option<LocalSpec>,
    live: Arc<Live>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    let global = Arc::new(Semaphore::new(live.load().max_connections));
    let per_ip = Arc::new(PerIp::default());
    if let Some(local) = local {
        spawn_local_accept_loop(
            local,
            live.clone(),
            shutdown.clone(),
            tracker,
            global.clone(),
            per_ip.clone(),
        );
    }
    for spec in specs {
        let ListenerSpec { listener, kind } = spec;
        let implicit_tls = kind == ListenerKind::Submissions;
        let live = live.clone();
        let shutdown = shutdown.clone();
        let tracker2 = tracker.clone();
        let global = global.clone();
        let per_ip = per_ip.clone();
        tracker.spawn(async move {
            let local = listener.local_addr().ok();
            loop {
                let accepted = tokio::select! {
                    _ = shutdown.cancelled() => break,
                    r = listener.accept() => r,
                };
                let (stream, peer) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                let ctx = live.load();
                let Some(session_cfg) = ctx.sessions.get(&kind).cloned() else {
                    tracing::error!(listener = kind.as_str(), "no session settings for this listener kind");
                    continue;
                };
                let shutdown = shutdown.clone();
                let global = global.clone();
                let per_ip = per_ip.clone();
                let active = Active::new(&live);
                tracker2.spawn(async move {
                    let _active = active;
                    let Ok(_permit) = global.try_acquire_owned() else {
                        refuse(stream, reply::too_many_connections(&session_cfg.hostname)).await;
                        tracing::warn!(client = %peer.ip(), "refused: too many connections");
                        return;
                    };
                    let Some(_slot) = per_ip.acquire(PeerKey::Ip(peer.ip()), ctx.max_connections_per_ip) else {
                        let r = reply::too_many_connections_from(&session_cfg.hostname, &peer.ip().to_string());
                        refuse(stream, r).await;
                        tracing::warn!(client = %peer.ip(), "refused: too many connections from this address");
                        return;
                    };
                    handle_connection(stream, peer, &ctx, session_cfg, implicit_tls, kind.as_str(), &shutdown)
                        .await;
                });
            }
            tracing::debug!(address = ?local, "accept loop stopped");
        });
    }
}

/// The accept loop of the submit socket: like a TCP listener's, with the peer's credentials
/// instead of its address. Removes the socket file when it stops.
fn spawn_local_accept_loop(
    spec: LocalSpec,
    live: Arc<Live>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
    global: Arc<Semaphore>,
    per_ip: Arc<PerIp>,
) {
    let LocalSpec { listener, path } = spec;
    let tracker2 = tracker.clone();
    tracker.spawn(async move {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = listener.accept() => r,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "submit socket: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let ctx = live.load();
            let shutdown = shutdown.clone();
            let global = global.clone();
            let per_ip = per_ip.clone();
            let session_cfg = ctx.local_session.clone();
            let active = Active::new(&live);
            tracker2.spawn(async move {
                let _active = active;
                let cred = match stream.peer_cred() {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "submit socket: no peer credentials");
                        return;
                    }
                };
                let uid = cred.uid();
                let Ok(_permit) = global.try_acquire_owned() else {
                    refuse(stream, reply::too_many_connections(&session_cfg.hostname)).await;
                    tracing::warn!(client = "local", uid, "refused: too many connections");
                    return;
                };
                let Some(_slot) = per_ip.acquire(PeerKey::Uid(uid), ctx.max_connections_per_ip)
                else {
                    let r = reply::too_many_connections_from(
                        &session_cfg.hostname,
                        &format!("uid {uid}"),
                    );
                    refuse(stream, r).await;
                    tracing::warn!(
                        client = "local",
                        uid,
                        "refused: too many connections from this user"
                    );
                    return;
                };
                // The user database may be remote (NSS): off the async workers.
                let user = tokio::task::spawn_blocking(move || user_name(uid))
                    .await
                    .ok()
                    .flatten();
                let peer = LocalPeer {
                    uid,
                    pid: cred.pid(),
                    user,
                };
                handle_local_connection(stream, peer, &ctx, session_cfg, &shutdown).await;
            });
        }
        drop(listener);
        let _ = std::fs::remove_file(&path);
        tracing::debug!(socket = %path.display(), "submit socket closed");
    });
}

/// The login name of `uid` (getpwuid_r), when the user database has one.
pub fn user_name(uid: u32) -> Option<String> {
    let mut buf = vec![0u8; 1024];
    loop {
        // SAFETY: a zeroed passwd is a valid out-parameter; getpwuid_r writes only into it and
        // into `buf` (whose length it is given), and `result` points at `pw` or is null.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe {
            libc::getpwuid_r(
                uid,
                &mut pw,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < 1 << 20 {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 || result.is_null() || pw.pw_name.is_null() {
            return None;
        }
        // SAFETY: on success pw_name points at a NUL-terminated string inside `buf`.
        let name = unsafe { std::ffi::CStr::from_ptr(pw.pw_name) };
        return Some(name.to_string_lossy().into_owned());
    }
}

/// The reply when a message cannot be stored: a full disk is 452 4.3.1 (RFC 3463), the
/// client comes back later; anything else 451.
fn storage_reply(e: &io::Error) -> Reply {
    if matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) {
        reply::insufficient_storage()
    } else {
        reply::queue_error()
    }
}

/// Appends a block of a large message to its spill file (created with the first block), from
/// the blocking pool: a write the kernel throttles must not stall the other sessions.
async fn spill_block(
    queue: &QueueHandle,
    spill: &mut Option<Box<SpillWriter>>,
    chunk: Vec<u8>,
) -> io::Result<()> {
    let mut w = match spill.take() {
        Some(w) => w,
        None => Box::new(SpillWriter::new(queue.spill_file()?)),
    };
    let w = tokio::task::spawn_blocking(move || w.write_block(&chunk).map(|()| w))
        .await
        .map_err(io::Error::other)??;
    *spill = Some(w);
    Ok(())
}

/// A large message once it is all received: its spill file with the last octets appended.
async fn spilled(w: Box<SpillWriter>, tail: Vec<u8>) -> io::Result<Spilled> {
    tokio::task::spawn_blocking(move || w.finish(&tail))
        .await
        .map_err(io::Error::other)?
}

async fn refuse<S: AsyncWrite + Unpin>(mut stream: S, r: Reply) {
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&r.to_bytes())).await;
    let _ = stream.shutdown().await;
}

/// Reads what the socket has into the session. The buffer lives on this (synchronous) stack
/// frame, not in the connection's future, so an idle plaintext connection costs no read buffer.
fn read_into(conn: &Conn, session: &mut Session) -> io::Result<usize> {
    let mut buf = [0u8; 16 * 1024];
    let n = match conn {
        Conn::Plain(s) => s.try_read(&mut buf)?,
        Conn::Unix(s) => s.try_read(&mut buf)?,
        Conn::Tls(_) | Conn::Gone => return Err(io::ErrorKind::WouldBlock.into()),
    };
    session.feed(&buf[..n]);
    Ok(n)
}

/// The connection: plaintext until STARTTLS (or TLS from the start on 465), or the local
/// submission socket.
enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// The submit socket: never encrypted (it never leaves the machine).
    Unix(UnixStream),
    /// Only during the STARTTLS handshake, while the TCP stream is being upgraded.
    Gone,
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection in TLS handshake")
}

/// What a wait for input produced.
enum Ready {
    /// The plaintext (TCP or Unix) socket is readable (read it with `read_into`).
    Plain,
    /// This many bytes were read from TLS into the buffer (0: the client closed).
    Tls(usize),
}

impl Conn {
    /// Writes `bytes`, giving up after `limit`: a client that does not read its replies
    /// must not hold its connection slot (nor delay a stop) beyond the command timeout.
    async fn write_all(&mut self, bytes: &[u8], limit: Duration) -> io::Result<()> {
        match tokio::time::timeout(limit, self.write_all_unbounded(bytes)).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client does not read its replies",
            )),
        }
    }

    async fn write_all_unbounded(&mut self, bytes: &[u8]) -> io::Result<()> {
        match self {
            Conn::Plain(s) => s.write_all(bytes).await,
            Conn::Unix(s) => s.write_all(bytes).await,
            Conn::Tls(s) => {
                s.write_all(bytes).await?;
                s.flush().await
            }
            Conn::Gone => Err(gone()),
        }
    }

    async fn shutdown(&mut self) {
        let _ = match self {
            Conn::Plain(s) => s.shutdown().await,
            Conn::Unix(s) => s.shutdown().await,
            Conn::Tls(s) => s.shutdown().await,
            Conn::Gone => Ok(()),
        };
    }

    /// Waits until there is input. For TLS the bytes are read into `buf` (allocated on first
    /// use: only encrypted connections pay for it; rustls holds buffers of its own anyway).
    async fn wait_read(&mut self, buf: &mut Vec<u8>) -> io::Result<Ready> {
        match self {
            Conn::Plain(s) => s.readable().await.map(|()| Ready::Plain),
            Conn::Unix(s) => s.readable().await.map(|()| Ready::Plain),
            Conn::Tls(s) => {
                if buf.is_empty() {
                    buf.resize(8 * 1024, 0);
                }
                s.read(buf).await.map(Ready::Tls)
            }
            Conn::Gone => Err(gone()),
        }
    }
}

/// The TLS handshake with a time limit; the description of the session on success.
async fn handshake(
    tls: &tls::Tls,
    tcp: TcpStream,
    limit: Duration,
) -> io::Result<(tokio_rustls::server::TlsStream<TcpStream>, String)> {
    let accepted = tokio::time::timeout(limit, tls.acceptor().accept(tcp))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
    let (tcp, conn) = accepted.get_ref();
    let client = tcp
        .peer_addr()
        .map(|a| a.ip().to_string())
        .unwrap_or_default();
    tracing::info!(target: "estafeta::maillog", client, version = %tls::version_name(conn), cipher = tls::cipher_name(conn).unwrap_or_default(), "TLS established");
    let description = tls::session_description(conn);
    Ok((accepted, description))
}

/// Answers [`Action::Authenticate`]: decodes the SASL responses, waits out the throttle for
/// this address, checks the password on the blocking pool, and on failure waits a fixed delay
/// so that every failure takes the same time.
async fn authenticate(
    auth: &AuthContext,
    peer: IpAddr,
    answer: &SaslAnswer,
) -> Result<String, Reply> {
    use estafeta_auth::sasl;
    let mechanism = answer.mechanism().as_str();
    let decoded = match answer {
        SaslAnswer::Plain(r) => sasl::decode_plain(r).map(|p| (p.authcid, p.password)),
        SaslAnswer::Login { user, password } => sasl::decode_login_step(user)
            .and_then(|u| sasl::decode_login_step(password).map(|p| (u, p))),
    };
    // First the back-off this address has earned, then the check, whose failures all take
    // the same fixed time on top.
    let throttle = auth.throttle.delay(peer);
    if !throttle.is_zero() {
        tokio::time::sleep(throttle).await;
    }
    let started = Instant::now();
    let (user, ok) = match decoded {
        Ok((user, password)) => {
            let ok = auth.verifier.verify(&user, &password).await;
            (user, ok)
        }
        Err(_) => (String::new(), false),
    };
    if ok {
        auth.throttle.record_success(peer);
        let user = user.to_lowercase();
        tracing::info!(target: "estafeta::maillog", client = %peer, user = %user, mechanism, "authenticated");
        return Ok(user);
    }
    let failures = auth.throttle.record_failure(peer);
    // fail2ban: "authentication failed … client=IP".
    tracing::warn!(target: "estafeta::maillog", client = %peer, user = ?user, mechanism, failures, "authentication failed");
    let spent = started.elapsed();
    if spent < auth.failure_delay {
        tokio::time::sleep(auth.failure_delay - spent).await;
    }
    Err(reply::auth_failed())
}

/// VRFY/EXPN for a `trusted` configuration: the truth for trusted clients (authenticated, or
/// inside mynetworks), nothing for the others (`252` for VRFY, `502` for EXPN).
fn verify(policy: &Policy, client: &Client, argument: &str, expn: bool) -> Reply {
    if policy.trust(client) == estafeta_policy::Trust::None {
        return if expn {
            reply::expn_disabled()
        } else {
            reply::vrfy_ambiguous()
        };
    }
    let arg = argument
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>');
    let Ok((path, _)) = estafeta_proto::address::parse_forward_path(&format!("<{arg}>")) else {
        return reply::syntax("VRFY/EXPN user@domain");
    };
    match policy.resolve_recipient(&path) {
        None => reply::user_unknown(&path.to_string()),
        Some(targets) if expn => {
            reply::expn_list(&targets.iter().map(|t| t.address()).collect::<Vec<_>>())
        }
        Some(_) => reply::vrfy_ok(&path.to_string()),
    }
}

/// An RCPT to one of our SRS addresses: `Some(Ok(original))` when it is genuine,
/// `Some(Err(550))` when it is ours but forged or expired, `None` when it is not an SRS address
/// of our SRS domain (the usual policy applies).
fn srs_recipient(
    ma: &MailAuth,
    path: &estafeta_proto::ForwardPath,
) -> Option<Result<String, Reply>> {
    let srs = ma.srs.as_ref()?;
    let address = path.to_string();
    let (local, domain) = address.rsplit_once('@')?;
    if !domain.eq_ignore_ascii_case(srs.domain()) || !estafeta_mailauth::srs::Srs::is_srs(local) {
        return None;
    }
    // Every SRS-looking local part of the SRS domain is taken for SRS (as postsrsd does): a
    // mailbox there must not start with SRS0= or SRS1=.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Some(
        srs.reverse(local, now)
            .map_err(|e| reply::srs_invalid(&address, &e.to_string())),
    )
}

/// The SPF results of the transaction in progress, looked up at most once per MAIL FROM.
async fn spf_of<'a>(
    cache: &'a mut Option<Box<(String, SpfResults)>>,
    checker: &estafeta_mailauth::verify::Checker,
    session: &Session,
    ip: IpAddr,
) -> &'a SpfResults {
    let sender = session
        .mail_from()
        .map(|f| f.to_string())
        .unwrap_or_default();
    if cache.as_ref().is_none_or(|c| c.0 != sender) {
        let helo = session.helo_name().unwrap_or_default().to_string();
        let results = checker.spf(ip, &helo, &sender).await;
        *cache = Some(Box::new((sender, results)));
    }
    &cache.as_ref().expect("just filled").1
}

/// The `Message-ID:` of a message (the field's value, unfolded and trimmed), for the mail log;
/// only the header section is looked at.
fn message_id(content: &[u8]) -> Option<String> {
    let mut lines = content
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let mut value: Option<Vec<u8>> = None;
    for line in lines.by_ref() {
        if line.is_empty() {
            break;
        }
        match (&mut value, line.first()) {
            // A folded continuation of the Message-ID field.
            (Some(v), Some(b' ' | b'\t')) => v.extend_from_slice(line),
            (Some(_), _) => break,
            (None, _) => {
                if line.len() >= 11 && line[..11].eq_ignore_ascii_case(b"message-id:") {
                    value = Some(line[11..].to_vec());
                }
            }
        }
    }
    value.map(|v| String::from_utf8_lossy(&v).trim().to_string())
}

/// Drives one SMTP session over one TCP connection.
pub async fn handle_connection(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: &ListenerContext,
    session_cfg: Arc<SessionConfig>,
    implicit_tls: bool,
    kind: &'static str,
    shutdown: &CancellationToken,
) {
    let started = Instant::now();
    // The client's name, confirmed forward (FCrDNS), as Postfix looks it up before greeting.
    let client_name = match &ctx.mail_auth.checker {
        // Boxed, as the checks below: their futures are large, and a future held inline
        // would make every idle connection's task that large.
        Some(checker) => Box::pin(checker.client_name(peer.ip())).await,
        None => None,
    };
    tracing::info!(target: "estafeta::maillog", client = %peer.ip(), port = peer.port(), listener = kind, client_name = client_name.as_deref().unwrap_or("unknown"), "connect");
    let outside = ctx.policy.mynetworks_match(peer.ip()).is_none();
    // Connection rate per address (IPv6 per /64), for clients outside mynetworks.
    if outside && let Err(e) = ctx.rates.connection(peer.ip()) {
        let r = reply::connection_rate_exceeded(
            &ctx.mail_auth.hostname,
            &peer.ip().to_string(),
            &e.rate.to_string(),
        );
        tracing::info!(target: "estafeta::maillog", client = %peer.ip(), limit = %e, reply = %r, status = r.status.map(tracing::field::display), "reject CONNECT");
        refuse(stream, r).await;
        return;
    }
    // DNS blocklists: on the MX port, for clients outside mynetworks, before the greeting.
    if kind == "smtp"
        && !ctx.mail_auth.dnsbl.is_empty()
        && outside
        && let Some(checker) = &ctx.mail_auth.checker
    {
        let verdict = Box::pin(checker.dnsbl(
            peer.ip(),
            &ctx.mail_auth.dnsbl,
            ctx.mail_auth.dnsbl_threshold,
        ))
        .await;
        if let Some(zone) = &verdict.blocked_by {
            let r = reply::dnsbl_listed(&peer.ip().to_string(), zone);
            tracing::info!(target: "estafeta::maillog", client = %peer.ip(), zone = %zone, score = verdict.score, listed = %verdict.listed.join(","), reply = %r, status = r.status.map(tracing::field::display), "reject CONNECT");
            refuse(stream, r).await;
            return;
        }
        if !verdict.listed.is_empty() {
            // Listed, but under the threshold (or allowlisted): served, and said so.
            tracing::info!(target: "estafeta::maillog", client = %peer.ip(), score = verdict.score, listed = %verdict.listed.join(","), "dnsbl pass");
        }
    }
    // Early talkers: on the MX port, clients outside mynetworks wait `greet_delay` for the
    // 220; one that sends first is a bot that does not wait (postscreen's pregreet test).
    if kind == "smtp" && outside && !ctx.greet_delay.is_zero() {
        let mut byte = [0u8; 1];
        match tokio::time::timeout(ctx.greet_delay, stream.peek(&mut byte)).await {
            // Quiet for the whole delay: greeted below.
            Err(_) => {}
            Ok(Ok(0)) | Ok(Err(_)) => {
                tracing::info!(target: "estafeta::maillog", client = %peer.ip(), "disconnected before the greeting");
                return;
            }
            Ok(Ok(_)) => {
                let r = reply::early_talker();
                tracing::info!(target: "estafeta::maillog", client = %peer.ip(), reply = %r, status = r.status.map(tracing::field::display), "reject CONNECT: early talker");
                refuse(stream, r).await;
                return;
            }
        }
    }
    if let Some(ranges) = &ctx.open_relay {
        tracing::warn!(client = %peer.ip(), "open relay: mynetworks {ranges} is an open relay: any host on the internet may relay mail through this server (allow_open_relay = true)");
    }
    let (conn, session) = if implicit_tls {
        let Some(tls) = &ctx.tls else {
            tracing::error!("implicit TLS listener without a certificate");
            return;
        };
        match handshake(
            tls,
            stream,
            ctx.command_timeout.min(Duration::from_secs(60)),
        )
        .await
        {
            Ok((s, description)) => (
                Conn::Tls(Box::new(s)),
                Session::with_tls(session_cfg, peer, Some(description)),
            ),
            Err(e) => {
                tracing::info!(target: "estafeta::maillog", client = %peer.ip(), error = %e, "TLS handshake failed");
                return;
            }
        }
    } else {
        (Conn::Plain(stream), Session::new(session_cfg, peer))
    };
    let mut session = session;
    session.set_client_name(client_name);
    let listener_kind = [
        ListenerKind::Smtp,
        ListenerKind::Submission,
        ListenerKind::Submissions,
    ]
    .into_iter()
    .find(|k| k.as_str() == kind);
    drive(
        conn,
        session,
        &Peer::Tcp(peer),
        ctx,
        shutdown,
        started,
        listener_kind,
    )
    .await;
}

/// Drives one SMTP session over one connection to the submit socket: the same session as on
/// TCP (`session_cfg` without STARTTLS and AUTH), by a local user trusted like mynetworks.
pub async fn handle_local_connection(
    stream: UnixStream,
    local: LocalPeer,
    ctx: &ListenerContext,
    session_cfg: Arc<SessionConfig>,
    shutdown: &CancellationToken,
) {
    let started = Instant::now();
    tracing::info!(
        target: "estafeta::maillog",
        client = "local",
        listener = "local",
        uid = local.uid,
        user = local.user.as_deref().unwrap_or(""),
        pid = local.pid.unwrap_or(0),
        "connect"
    );
    let session = Session::local(session_cfg, local.uid);
    drive(
        Conn::Unix(stream),
        session,
        &Peer::Local(local),
        ctx,
        shutdown,
        started,
        None,
    )
    .await;
}

/// The session loop, the same for every kind of connection: what the session asks is
/// answered with the policy, the queue and AUTH; its replies are written out; input is read
/// under the session's timeout.
async fn drive(
    mut conn: Conn,
    mut session: Session,
    peer: &Peer,
    ctx: &ListenerContext,
    shutdown: &CancellationToken,
    started: Instant,
    kind: Option<ListenerKind>,
) {
    // Mail from outside is checked (SPF, DKIM, DMARC, ARC) on the MX port only.
    let inbound = kind == Some(ListenerKind::Smtp);
    let mut out: Vec<u8> = Vec::new();
    // The mail filters of this session, connected at its first RCPT.
    let mut filters = milters::SessionMilters::new(&ctx.milters, kind);
    // SPF of the transaction in progress, looked up once (at its first RCPT, or at the end of
    // its data): the MAIL FROM it was checked for, and the results.
    // Boxed: most sessions never look SPF up, and an idle one should stay small.
    let mut spf: Option<Box<(String, SpfResults)>> = None;
    // The SRS addresses accepted at RCPT in this transaction, with the address each stands
    // for: rewritten at the end of data to exactly what was checked (an address that expired
    // in between would otherwise be relayed to our own SRS domain).
    let mut srs_rcpts: Vec<(String, String)> = Vec::new();
    // Where each recipient accepted in this transaction goes (aliases resolved at its RCPT),
    // used as it is when the message is queued.
    let mut rcpt_targets: Vec<(String, Vec<estafeta_policy::Target>)> = Vec::new();
    let mut tls_buf: Vec<u8> = Vec::new();
    // A large message's content received so far (the session's taken blocks) and its length.
    let mut spill: Option<Box<SpillWriter>> = None;
    let mut spill_failed: Option<io::Error> = None;
    let mut messages = 0u32;
    let mut stopping = false;
    // When the client was last answered: a command (or a whole DATA transfer, or a BDAT
    // chunk) must be complete within its timeout from there. Bytes trickled in without ever
    // completing one (slowloris) do not restart the clock.
    let mut answered_at = Instant::now();
    let mut timeout_kind = session.timeout_kind();
    let reason = 'conn: loop {
        let mut close = false;
        while let Some(action) = session.poll() {
            match action {
                Action::Send(r) => r.write_to(&mut out),
                Action::CheckRcpt(rcpt) => {
                    let client = peer.client(&session);
                    if session.rcpt_count() == 0 {
                        // A new transaction: what the previous one resolved is gone.
                        rcpt_targets.clear();
                    }
                    let mut verdict = match srs_recipient(&ctx.mail_auth, &rcpt.path) {
                        // A bounce to one of our SRS addresses: accepted when genuine, whoever
                        // sends it (it goes back to the original sender only).
                        Some(Ok(original)) => {
                            tracing::info!(target: "estafeta::maillog", client = %peer, to = %rcpt.path, original = %original, "SRS bounce");
                            srs_rcpts.push((rcpt.path.to_string().to_lowercase(), original));
                            Ok(())
                        }
                        Some(Err(r)) => Err(r),
                        None => match ctx.policy.rcpt_verdict(&client, &rcpt.path) {
                            Verdict::Accept(targets) => {
                                let checked =
                                    Box::pin(verify_lmtp(ctx, &targets, &rcpt.path)).await;
                                if checked.is_ok() {
                                    rcpt_targets.push((rcpt.path.to_string(), targets));
                                }
                                checked
                            }
                            Verdict::Reject(r) => Err(r),
                        },
                    };
                    // SPF `fail` refused here when `[verify] spf = "reject"`.
                    if verdict.is_ok()
                        && inbound
                        && ctx.policy.trust(&client) == Trust::None
                        && let Some(checker) = &ctx.mail_auth.checker
                        && checker.mode().spf == estafeta_config::CheckMode::Enforce
                    {
                        let results =
                            Box::pin(spf_of(&mut spf, checker, &session, peer.ip())).await;
                        verdict = checker.spf_verdict(results, peer.ip());
                    }
                    // The mail filters, after our own checks: a recipient we refuse is not
                    // their business.
                    if let Some(f) = filters.as_mut() {
                        if session.rcpt_count() == 0 {
                            f.new_transaction();
                        }
                        if verdict.is_ok()
                            && let Some(from) = session.mail_from()
                        {
                            let info = session_info(&session, peer, ctx);
                            if let Err(r) = Box::pin(f.rcpt(&info, from, &rcpt.path)).await {
                                tracing::info!(target: "estafeta::maillog", client = %peer, to = %rcpt.path, reply = %r, "milter refused RCPT");
                                verdict = Err(r);
                            }
                        }
                    }
                    // Message and recipient rates: the message counts at its first accepted
                    // recipient.
                    if verdict.is_ok() && ctx.rates.any_message_limit() {
                        let (sender, who) = match ctx.policy.trust(&client) {
                            Trust::None => {
                                (rates::Sender::Outside(peer.ip()), peer.ip().to_string())
                            }
                            Trust::Authenticated(u) => {
                                (rates::Sender::User(u.clone()), format!("user {u}"))
                            }
                            Trust::Local(uid) => {
                                let name = match peer {
                                    Peer::Local(l) => l.user.clone(),
                                    Peer::Tcp(_) => None,
                                }
                                .unwrap_or_else(|| format!("uid {uid}"));
                                (
                                    rates::Sender::User(name.clone()),
                                    format!("local user {name}"),
                                )
                            }
                            Trust::Mynetworks(_) => (rates::Sender::Trusted, String::new()),
                        };
                        let counted = if session.rcpt_count() == 0 {
                            ctx.rates.message(&sender)
                        } else {
                            Ok(())
                        }
                        .and_then(|()| ctx.rates.recipient(&sender));
                        if let Err(e) = counted {
                            tracing::info!(target: "estafeta::maillog", client = %peer, to = %rcpt.path, limit = %e, "rate limit");
                            verdict = Err(reply::rate_exceeded(&e.to_string(), &who));
                        }
                    }
                    if let Err(r) = &verdict {
                        tracing::info!(target: "estafeta::maillog", client = %peer, to = %rcpt.path, reply = %r, status = r.status.map(tracing::field::display), "reject RCPT");
                    }
                    session.rcpt_checked(verdict);
                }
                Action::CheckMail { user, from } => {
                    let verdict = if ctx.policy.sender_owned(&user, &from) {
                        Ok(())
                    } else {
                        let r = reply::sender_not_owned(&from.to_string(), &user);
                        tracing::info!(target: "estafeta::maillog", client = %peer, user = %user, from = %from, status = r.status.map(tracing::field::display), "reject MAIL: sender not owned");
                        Err(r)
                    };
                    session.mail_checked(verdict);
                }
                Action::Authenticate(answer) => {
                    let result = match &ctx.auth {
                        Some(auth) => authenticate(auth, peer.ip(), &answer).await,
                        None => Err(reply::auth_temporary_failure()),
                    };
                    session.auth_checked(result);
                }
                Action::StartTls => {
                    // The 220 goes out in plaintext first.
                    if !out.is_empty() {
                        if let Err(e) = conn.write_all(&out, ctx.command_timeout).await {
                            break 'conn format!("write error: {e}");
                        }
                        out.clear();
                    }
                    let (Some(tls), Conn::Plain(_)) = (&ctx.tls, &conn) else {
                        break 'conn "STARTTLS without a certificate".to_string();
                    };
                    let Conn::Plain(tcp) = std::mem::replace(&mut conn, Conn::Gone) else {
                        break 'conn "STARTTLS on an encrypted connection".to_string();
                    };
                    match handshake(tls, tcp, ctx.command_timeout.min(Duration::from_secs(60)))
                        .await
                    {
                        Ok((s, description)) => {
                            conn = Conn::Tls(Box::new(s));
                            session.tls_started(description);
                        }
                        Err(e) => {
                            tracing::info!(target: "estafeta::maillog", client = %peer.ip(), error = %e, "TLS handshake failed");
                            break 'conn format!("TLS handshake failed: {e}");
                        }
                    }
                }
                Action::Enqueue(mut envelope, tail) => {
                    // A large message: what was taken is in the spill file, the tail joins it.
                    let taken = session.body_taken();
                    let failed = spill_failed.take();
                    let mut body = match spill.take() {
                        _ if taken == 0 => MessageBody::Memory(tail),
                        Some(w) if w.written() == taken && failed.is_none() => {
                            match Box::pin(spilled(w, tail)).await {
                                Ok(s) => MessageBody::Spilled(s),
                                Err(e) => {
                                    tracing::error!(client = %peer, error = %e, "cannot write a large message to the spool directory");
                                    session.enqueued(Err(storage_reply(&e)));
                                    continue;
                                }
                            }
                        }
                        // A block could not be written: the message is not whole.
                        _ => {
                            let e = failed.unwrap_or_else(|| io::Error::other("lost"));
                            session.enqueued(Err(storage_reply(&e)));
                            continue;
                        }
                    };
                    let client = peer.client(&session);
                    let trust = ctx.policy.trust(&client);
                    let ma = &ctx.mail_auth;
                    // The checks before the 250: mail from outside is verified and marked (or
                    // refused); our users' mail is completed and signed.
                    if inbound
                        && trust == Trust::None
                        && let Some(checker) = &ma.checker
                        && checker.mode().any()
                    {
                        let sender = envelope.from.to_string();
                        let cached = match spf.take().map(|b| *b) {
                            Some((from, results)) if from == sender => Some(results),
                            _ => None,
                        };
                        let result = match &mut body {
                            MessageBody::Memory(v) => {
                                Box::pin(checker.check_message(
                                    peer.ip(),
                                    &envelope.client.helo,
                                    &sender,
                                    session.client_name(),
                                    cached,
                                    v,
                                ))
                                .await
                            }
                            MessageBody::Spilled(s) => match s.map_received() {
                                Ok(map) => {
                                    Box::pin(checker.check_parts(
                                        peer.ip(),
                                        &envelope.client.helo,
                                        &sender,
                                        session.client_name(),
                                        cached,
                                        s.head_mut(),
                                        &map,
                                    ))
                                    .await
                                }
                                Err(e) => {
                                    tracing::error!(client = %peer, error = %e, "cannot read a large message back");
                                    session.enqueued(Err(reply::queue_error()));
                                    continue;
                                }
                            },
                        };
                        tracing::info!(target: "estafeta::maillog", client = %peer, from = %envelope.from, results = %result.summary, dmarc_policy = result.dmarc_policy.unwrap_or(""), "checked");
                        if let Err(r) = result.verdict {
                            tracing::info!(target: "estafeta::maillog", client = %peer, from = %envelope.from, reply = %r, status = r.status.map(tracing::field::display), "reject DATA");
                            session.enqueued(Err(r));
                            continue;
                        }
                        body.prepend(result.header.as_bytes());
                    } else {
                        estafeta_mailauth::headers::strip_our_results(
                            body.head_mut(),
                            &ma.hostname,
                        );
                        if matches!(trust, Trust::Authenticated(_) | Trust::Local(_)) {
                            let now = std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_secs());
                            estafeta_mailauth::headers::add_missing(
                                body.head_mut(),
                                &ma.hostname,
                                now,
                            );
                        }
                    }
                    // The mail filters see the message with our Authentication-Results, and
                    // may change it; what they leave is what is signed and queued.
                    let mut quarantine = None;
                    if let Some(f) = filters.as_mut() {
                        let info = session_info(&session, peer, ctx);
                        match Box::pin(f.message(&info, &mut envelope, &mut body)).await {
                            milters::MessageVerdict::Accept => {}
                            milters::MessageVerdict::Refuse(r) => {
                                tracing::info!(target: "estafeta::maillog", client = %peer, from = %envelope.from, reply = %r, status = r.status.map(tracing::field::display), "reject DATA: milter");
                                session.enqueued(Err(r));
                                continue;
                            }
                            milters::MessageVerdict::Discard => {
                                tracing::info!(target: "estafeta::maillog", client = %peer, from = %envelope.from, "discarded by a milter");
                                session.enqueued(Ok("discarded".into()));
                                continue;
                            }
                            milters::MessageVerdict::Quarantine(reason) => {
                                quarantine = Some(reason);
                            }
                        }
                    }
                    if trust != Trust::None {
                        let signed = match &body {
                            MessageBody::Memory(v) => ma.signer.sign(v),
                            MessageBody::Spilled(s) => match s.map_received() {
                                Ok(map) => ma
                                    .signer
                                    .sign_parts(s.fields(), s.separator_and_body_of(&map)),
                                Err(e) => Some(Err(e.to_string())),
                            },
                        };
                        match signed {
                            Some(Ok(signed)) => {
                                tracing::debug!(client = %peer, keys = %signed.selectors.join(" "), "DKIM signed");
                                body.prepend(signed.fields.as_bytes());
                            }
                            Some(Err(e)) => {
                                tracing::warn!(client = %peer, error = %e, "cannot DKIM-sign the message: sent unsigned");
                            }
                            None => {}
                        }
                    }
                    // Bounces to our SRS addresses go back to the original sender.
                    for r in &mut envelope.rcpts {
                        let address = r.path.to_string().to_lowercase();
                        if let Some((_, original)) = srs_rcpts.iter().find(|(a, _)| *a == address)
                            && let Ok((path, _)) = estafeta_proto::address::parse_forward_path(
                                &format!("<{original}>"),
                            )
                        {
                            r.path = path;
                        }
                    }
                    srs_rcpts.clear();
                    // Aliases and catch-all are applied once, here: each stored recipient is
                    // then delivered exactly once.
                    let before: Vec<String> = envelope
                        .rcpts
                        .iter()
                        .map(|r| r.path.to_string().to_lowercase())
                        .collect();
                    let known = std::mem::take(&mut rcpt_targets);
                    envelope.rcpts = ctx.policy.expand_recipients_with(
                        std::mem::take(&mut envelope.rcpts),
                        |path| {
                            let p = path.to_string();
                            known.iter().find(|(a, _)| *a == p).map(|(_, t)| t.clone())
                        },
                    );
                    // Forwarded to another domain: the sender is rewritten (SRS) so that the next
                    // hop's SPF check passes.
                    if let Some(srs) = &ma.srs
                        && let estafeta_proto::ReversePath::Mailbox(m) = &envelope.from
                        && !ctx.policy.is_local_domain(&m.domain.key())
                        && envelope.rcpts.iter().any(|r| {
                            let a = r.path.to_string().to_lowercase();
                            !before.contains(&a)
                                && a.rsplit_once('@')
                                    .is_some_and(|(_, d)| !ctx.policy.is_local_domain(d))
                        })
                    {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_secs());
                        if let Some(rewritten) = srs.forward(&envelope.from.to_string(), now) {
                            match estafeta_proto::address::parse_reverse_path(&format!(
                                "<{rewritten}>"
                            )) {
                                Ok((from, _)) => {
                                    tracing::info!(target: "estafeta::maillog", client = %peer, from = %envelope.from, srs = %rewritten, "SRS rewrite");
                                    envelope.from = from;
                                }
                                Err(_) => {
                                    tracing::warn!(client = %peer, from = %envelope.from, srs = ?rewritten, "SRS: the rewritten sender is not a valid address; forwarded with the original sender");
                                }
                            }
                        }
                    }
                    let from = envelope.from.to_string();
                    let nrcpt = envelope.rcpts.len();
                    let size = body.len();
                    let message_id = message_id(body.head());
                    let auth_user = session.auth_user().unwrap_or("");
                    // The "queued" line, logged as soon as the message is durable: before the
                    // lines of a delivery made before the acknowledgement.
                    let log_queued = |id: estafeta_queue::QueueId| match peer {
                        Peer::Local(l) => {
                            tracing::info!(target: "estafeta::maillog", id = %id, client = %peer, from = %from, size, nrcpt, message_id = ?message_id.as_deref().unwrap_or(""), uid = l.uid, user = l.user.as_deref().unwrap_or(""), "queued")
                        }
                        Peer::Tcp(_) => {
                            tracing::info!(target: "estafeta::maillog", id = %id, client = %peer, from = %from, size, nrcpt, message_id = ?message_id.as_deref().unwrap_or(""), user = auth_user, "queued")
                        }
                    };
                    let result = match &quarantine {
                        // Boxed: a delivery made before the acknowledgement is a large
                        // future, which an idle connection's task would otherwise carry.
                        None => Box::pin(ctx.queue.submit_then(*envelope, body, log_queued)).await,
                        Some(reason) => {
                            let r = Box::pin(ctx.queue.submit_held(*envelope, body)).await;
                            if let Ok(id) = &r {
                                tracing::info!(target: "estafeta::maillog", id = %id, client = %peer, reason = %reason, "quarantined by a milter (held)");
                                log_queued(*id);
                            }
                            r
                        }
                    };
                    let answer = match result {
                        Ok(id) => {
                            messages += 1;
                            Ok(id.to_string())
                        }
                        Err(e) => {
                            tracing::error!(client = %peer, error = %e, "cannot queue message");
                            Err(storage_reply(&e))
                        }
                    };
                    session.enqueued(answer);
                }
                Action::Verify { argument, expn } => {
                    let client = peer.client(&session);
                    let r = verify(&ctx.policy, &client, &argument, expn);
                    tracing::info!(target: "estafeta::maillog", client = %peer, argument = ?argument, expn, reply = %r, "verify");
                    session.verified(r);
                }
                Action::Etrn(domain) => {
                    let client = peer.client(&session);
                    let r = if ctx.policy.trust(&client) == estafeta_policy::Trust::None {
                        reply::etrn_not_allowed(&domain)
                    } else {
                        match ctx.queue.flush_domain(&domain).await {
                            Ok(n) => reply::etrn_started(&domain, n),
                            // Stopping: nothing can be started now.
                            Err(_) => reply::etrn_unable(&domain),
                        }
                    };
                    tracing::info!(target: "estafeta::maillog", client = %peer, domain = ?domain, reply = %r, "etrn");
                    session.etrn_done(r);
                }
                Action::Pause(d) => {
                    if !out.is_empty() {
                        if let Err(e) = conn.write_all(&out, ctx.command_timeout).await {
                            break 'conn format!("write error: {e}");
                        }
                        out.clear();
                    }
                    tracing::info!(target: "estafeta::maillog", client = %peer, delay_ms = d.as_millis() as u64, "slowing down recipient probing");
                    tokio::time::sleep(d).await;
                }
                Action::Close => close = true,
            }
        }
        // A large message goes to a file as it arrives, a block at a time.
        let before = session.body_taken();
        if let Some(chunk) = session.take_body(estafeta_queue::SPILL_AT) {
            if before == 0 {
                // The first block of this transaction: what an earlier one left goes.
                spill = None;
                spill_failed = None;
            }
            if spill_failed.is_some() {
                // An earlier block failed: the message will be refused, the rest dropped.
            } else if let Err(e) = Box::pin(spill_block(&ctx.queue, &mut spill, chunk)).await {
                tracing::error!(client = %peer, error = %e, "cannot write a large message to the spool directory");
                spill = None;
                spill_failed = Some(e);
            }
        }
        if session.body_taken() == 0 {
            // No transaction holds content any more (queued, refused, reset): an aborted
            // message's file goes now, not when the client next sends one or leaves.
            spill = None;
            spill_failed = None;
        }
        if !out.is_empty() {
            if let Err(e) = conn.write_all(&out, ctx.command_timeout).await {
                break format!("write error: {e}");
            }
            out.clear();
            if out.capacity() > 4096 {
                out = Vec::new();
            }
            answered_at = Instant::now();
        }
        if session.timeout_kind() != timeout_kind {
            timeout_kind = session.timeout_kind();
            answered_at = Instant::now();
        }
        if close || session.is_closed() {
            conn.shutdown().await;
            break "closed".to_string();
        }
        // Stopping: a message being received was let finish (and answered); now the session
        // ends with 421 4.3.2 like the others.
        if stopping && session.timeout_kind() == Timeout::Command {
            session.shutting_down();
            continue;
        }
        let limit = match session.timeout_kind() {
            Timeout::Command => ctx.command_timeout,
            Timeout::Data => ctx.data_timeout,
        }
        .saturating_sub(answered_at.elapsed());
        let ready = tokio::select! {
            _ = shutdown.cancelled(), if !stopping => {
                // A client sending a message may finish it (within the server's grace
                // period): it is answered, then the session ends; the others end now.
                stopping = true;
                continue;
            }
            r = tokio::time::timeout(limit, conn.wait_read(&mut tls_buf)) => r,
        };
        match ready {
            Err(_) => {
                tracing::info!(target: "estafeta::maillog", client = %peer, "timeout");
                session.timed_out();
            }
            Ok(Err(e)) => break format!("read error: {e}"),
            Ok(Ok(Ready::Tls(0))) => break "client closed".to_string(),
            Ok(Ok(Ready::Tls(n))) => session.feed(&tls_buf[..n]),
            Ok(Ok(Ready::Plain)) => match read_into(&conn, &mut session) {
                Ok(0) => break "client closed".to_string(),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => break format!("read error: {e}"),
            },
        }
    };
    tracing::info!(
        target: "estafeta::maillog",
        client = %peer,
        messages,
        tls = session.is_tls(),
        user = session.auth_user().unwrap_or(""),
        duration_ms = started.elapsed().as_millis() as u64,
        reason = %reason,
        "disconnect"
    );
    if let Some(f) = filters {
        f.quit().await;
    }
}

/// Recipients of a domain delivered over LMTP with `mailboxes = "*"`: each mailbox the RCPT
/// leads to is asked of the LMTP server (a cached probe), so that unknown users are refused
/// now rather than bounced later (no backscatter). A server that cannot answer gets the
/// client a temporary refusal, as Postfix's `reject_unverified_recipient` does.
async fn verify_lmtp(
    ctx: &ListenerContext,
    targets: &[estafeta_policy::Target],
    rcpt: &estafeta_proto::ForwardPath,
) -> Result<(), Reply> {
    for t in targets {
        let estafeta_policy::Target::Local(mb) = t else {
            continue;
        };
        let Some(server) = ctx.policy.lmtp_verified_domain(&mb.domain) else {
            continue;
        };
        let Some(client) = ctx.lmtp.get(server) else {
            return Err(reply::recipient_unverified(
                &rcpt.to_string(),
                &format!("no LMTP client for {server}"),
            ));
        };
        match client.verify(&mb.address()).await {
            estafeta_lmtp::Verification::Exists => {}
            estafeta_lmtp::Verification::Unknown(said) => {
                tracing::debug!(to = %rcpt, server, said = %said, "LMTP server does not know the recipient");
                return Err(reply::user_unknown(&rcpt.to_string()));
            }
            estafeta_lmtp::Verification::Unavailable(said) => {
                return Err(reply::recipient_unverified(
                    &rcpt.to_string(),
                    &said.to_string(),
                ));
            }
        }
    }
    Ok(())
}

/// What the mail filters are told about the session.
fn session_info<'a>(
    session: &'a Session,
    peer: &Peer,
    ctx: &'a ListenerContext,
) -> milters::SessionInfo<'a> {
    milters::SessionInfo {
        client_name: session.client_name(),
        peer: match peer {
            Peer::Tcp(a) => Some((a.ip(), a.port())),
            Peer::Local(_) => None,
        },
        hostname: &ctx.mail_auth.hostname,
        helo: session.helo_name(),
        auth_user: session.auth_user(),
    }
}

#[cfg(test)]
mod message_id_tests {
    use super::message_id;

    #[test]
    fn finds_the_header_field_only() {
        assert_eq!(
            message_id(b"Subject: x\r\nMessage-ID: <a@b>\r\n\r\nbody"),
            Some("<a@b>".into())
        );
        assert_eq!(
            message_id(b"message-id:\r\n <folded@b>\r\nTo: y\r\n\r\n"),
            Some("<folded@b>".into())
        );
        assert_eq!(
            message_id(b"Subject: x\r\n\r\nMessage-ID: <in@body>\r\n"),
            None
        );
    }
}
