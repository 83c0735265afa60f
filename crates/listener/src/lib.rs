//! estafeta-listener: the network side of SMTP.
//!
//! Accept loops with connection caps (global and per client address), one task per
//! connection driving a sans-IO [`Session`]: bytes in, actions out, answered with the policy
//! and the queue. Inactivity timeouts per RFC 5321 §4.5.3.2, and a graceful stop.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use estafeta_policy::{Policy, Route, Verdict};
use estafeta_proto::reply::{self, Reply};
use estafeta_proto::{Action, Session, SessionConfig, Timeout};
use estafeta_queue::QueueHandle;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What every session of a listener shares. Deliberately narrow: the session config, the
/// recipient policy and the queue handle, nothing else.
#[derive(Debug)]
pub struct ListenerContext {
    /// Settings for the SMTP sessions.
    pub session: Arc<SessionConfig>,
    /// The recipient policy.
    pub policy: Arc<Policy>,
    /// Where accepted messages go.
    pub queue: QueueHandle,
    /// Waiting for a command.
    pub command_timeout: Duration,
    /// Waiting for message content.
    pub data_timeout: Duration,
    /// Connections at once, in total.
    pub max_connections: usize,
    /// Connections at once from one client address.
    pub max_connections_per_ip: usize,
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

/// Counts connections per client address.
#[derive(Debug, Default)]
struct PerIp {
    counts: Mutex<HashMap<IpAddr, usize>>,
}

/// Decrements the per-address count when the connection ends.
struct IpSlot {
    table: Arc<PerIp>,
    ip: IpAddr,
}

impl Drop for IpSlot {
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = counts.get_mut(&self.ip) {
            *c -= 1;
            if *c == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

impl PerIp {
    fn acquire(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<IpSlot> {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let c = counts.entry(ip).or_insert(0);
        if *c >= max {
            return None;
        }
        *c += 1;
        Some(IpSlot {
            table: self.clone(),
            ip,
        })
    }
}

/// Runs the accept loops of `listeners` until `shutdown`; connection tasks are spawned on
/// `tracker` so that the caller can wait for them.
pub fn spawn_accept_loops(
    listeners: Vec<TcpListener>,
    ctx: Arc<ListenerContext>,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) {
    let global = Arc::new(Semaphore::new(ctx.max_connections));
    let per_ip = Arc::new(PerIp::default());
    for listener in listeners {
        let ctx = ctx.clone();
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
                let ctx = ctx.clone();
                let shutdown = shutdown.clone();
                let global = global.clone();
                let per_ip = per_ip.clone();
                tracker2.spawn(async move {
                    let Ok(_permit) = global.try_acquire_owned() else {
                        refuse(stream, reply::too_many_connections(&ctx.session.hostname)).await;
                        tracing::warn!(client = %peer.ip(), "refused: too many connections");
                        return;
                    };
                    let Some(_slot) = per_ip.acquire(peer.ip(), ctx.max_connections_per_ip) else {
                        let r = reply::too_many_connections_from(&ctx.session.hostname, &peer.ip().to_string());
                        refuse(stream, r).await;
                        tracing::warn!(client = %peer.ip(), "refused: too many connections from this address");
                        return;
                    };
                    handle_connection(stream, peer, &ctx, &shutdown).await;
                });
            }
            tracing::debug!(address = ?local, "accept loop stopped");
        });
    }
}

async fn refuse(mut stream: TcpStream, r: Reply) {
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(&r.to_bytes())).await;
    let _ = stream.shutdown().await;
}

/// Reads what the socket has into the session. The buffer lives on this (synchronous) stack
/// frame, not in the connection's future, so an idle connection costs no read buffer.
fn read_into(stream: &TcpStream, session: &mut Session) -> io::Result<usize> {
    let mut buf = [0u8; 16 * 1024];
    let n = stream.try_read(&mut buf)?;
    session.feed(&buf[..n]);
    Ok(n)
}

/// Drives one SMTP session over one TCP connection.
pub async fn handle_connection(
    mut stream: TcpStream,
    peer: SocketAddr,
    ctx: &ListenerContext,
    shutdown: &CancellationToken,
) {
    let started = Instant::now();
    tracing::info!(target: "estafeta::maillog", client = %peer.ip(), port = peer.port(), "connect");
    let mut session = Session::new(ctx.session.clone(), peer);
    let mut out: Vec<u8> = Vec::new();
    let mut messages = 0u32;
    let mut stopping = false;
    let reason = loop {
        let mut close = false;
        while let Some(action) = session.poll() {
            match action {
                Action::Send(r) => r.write_to(&mut out),
                Action::CheckRcpt(rcpt) => {
                    let verdict = match ctx.policy.rcpt_verdict(&rcpt.path) {
                        Verdict::Accept(Route::Local(_)) => Ok(()),
                        Verdict::Reject(r) => {
                            tracing::info!(target: "estafeta::maillog", client = %peer.ip(), to = %rcpt.path, reply = %r, "reject RCPT");
                            Err(r)
                        }
                    };
                    session.rcpt_checked(verdict);
                }
                Action::Enqueue(envelope, body) => {
                    let from = envelope.from.to_string();
                    let nrcpt = envelope.rcpts.len();
                    let size = body.len();
                    let result = ctx.queue.submit(*envelope, body).await;
                    let answer = match result {
                        Ok(id) => {
                            messages += 1;
                            tracing::info!(target: "estafeta::maillog", id = %id, client = %peer.ip(), from = %from, size, nrcpt, "queued");
                            Ok(id.to_string())
                        }
                        Err(e) => {
                            tracing::error!(client = %peer.ip(), error = %e, "cannot queue message");
                            Err(reply::queue_error())
                        }
                    };
                    session.enqueued(answer);
                }
                // Not offered yet by this listener (STARTTLS and AUTH are wired with the
                // submission issue); the session only asks when its config offers them.
                Action::CheckMail { .. } => session.mail_checked(Ok(())),
                Action::StartTls => {
                    session.shutting_down();
                }
                Action::Authenticate { .. } => {
                    session.auth_checked(Err(reply::auth_temporary_failure()));
                }
                Action::Close => close = true,
            }
        }
        if !out.is_empty() {
            if let Err(e) = stream.write_all(&out).await {
                break format!("write error: {e}");
            }
            out.clear();
            if out.capacity() > 4096 {
                out = Vec::new();
            }
        }
        if close || session.is_closed() {
            let _ = stream.shutdown().await;
            break "closed".to_string();
        }
        let limit = match session.timeout_kind() {
            Timeout::Command => ctx.command_timeout,
            Timeout::Data => ctx.data_timeout,
        };
        tokio::select! {
            _ = shutdown.cancelled(), if !stopping => {
                stopping = true;
                session.shutting_down();
            }
            r = tokio::time::timeout(limit, stream.readable()) => match r {
                Err(_) => {
                    tracing::info!(target: "estafeta::maillog", client = %peer.ip(), "timeout");
                    session.timed_out();
                }
                Ok(Err(e)) => break format!("read error: {e}"),
                Ok(Ok(())) => match read_into(&stream, &mut session) {
                    Ok(0) => break "client closed".to_string(),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => break format!("read error: {e}"),
                },
            },
        }
    };
    tracing::info!(
        target: "estafeta::maillog",
        client = %peer.ip(),
        messages,
        duration_ms = started.elapsed().as_millis() as u64,
        reason = %reason,
        "disconnect"
    );
}
