//! The scheduler: one event loop that hands due messages to the transport, with a cap on
//! concurrent deliveries, and retries on schedule. Not a task per message: a message waiting
//! for its retry is an entry in a heap, and the loop sleeps exactly until the next one is due.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use estafeta_proto::Envelope;
use estafeta_proto::reply::{self, Status};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{AdminAction, AdminReport, Selection, has_pending_in};
use crate::body::MessageBody;
use crate::clock::Clock;
use crate::id::QueueId;
use crate::spool::{QueuedMessage, RcptState, RcptStatus, Spool};
use crate::transport::{DeliveryJob, Failure, Outcome, Transport};

/// The scheduler's settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Deliveries in flight at once, in total.
    pub max_deliveries: usize,
    /// Deliveries in flight at once to one destination (see [`Transport::destinations`]).
    pub max_per_destination: usize,
    /// Waits between attempts; the last one repeats.
    pub retry: Vec<Duration>,
    /// This server's name: the Reporting-MTA of notifications.
    pub hostname: String,
    /// How long a message may stay queued; then its pending recipients fail (5.4.7).
    pub max_lifetime: Duration,
    /// After this long, a "delayed" notification (once); None: never.
    pub delay_warning: Option<Duration>,
    /// The most of an original message a failure report returns with `RET=FULL`.
    pub max_returned: usize,
    /// Where a notification that cannot be delivered is reported (a double bounce), as a
    /// failure report of its own; `None`: only logged.
    pub double_bounce_to: Option<estafeta_proto::Mailbox>,
    /// Where the time of day is read ([`Clock::System`] but in tests). Fixed at [`start`]: a
    /// reconfiguration keeps the running scheduler's clock.
    pub clock: Clock,
}

/// A snapshot of the queue, taken in the scheduler's loop ([`QueueHandle::stats`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Messages in the queue: due, waiting for a retry, held, waiting for a busy destination,
    /// and being attempted.
    pub messages: usize,
    /// Of those, held by the operator.
    pub held: usize,
    /// Of those, being attempted (or bounced by the operator) right now.
    pub in_flight: usize,
    /// Recipients not yet delivered nor failed, over all those messages.
    pub recipients_pending: usize,
    /// When the oldest message in the queue was accepted (Unix seconds); None when empty.
    pub oldest_arrival: Option<u64>,
}

/// When the scheduler's loop last turned, shared between the loop and its handles: the
/// milliseconds from `origin` (tokio's clock, so that tests on paused time see it move).
#[derive(Debug)]
struct Heartbeat {
    origin: Instant,
    last_ms: AtomicU64,
}

impl Heartbeat {
    fn new() -> Self {
        Heartbeat {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    /// Records that the loop turned now.
    fn beat(&self) {
        let ms = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// The time since the last turn.
    fn since(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.origin.elapsed().saturating_sub(last)
    }
}

/// How often an idle scheduler's loop turns anyway, so that [`QueueHandle::last_turn`] stays
/// fresh while the loop is healthy (the systemd watchdog relies on it).
pub const TICK: Duration = Duration::from_secs(1);

pub(crate) enum Event {
    /// A message was just accepted.
    New(QueuedMessage),
    /// An attempt finished; the message comes back with its new state (None: it is done).
    Done(QueueId, Option<QueuedMessage>),
    /// Try every waiting message now.
    Flush,
    /// The operator's request (`estafeta queue …`), answered on the channel.
    Admin(AdminAction, oneshot::Sender<AdminReport>),
    /// A snapshot of the queue, answered on the channel.
    Stats(oneshot::Sender<QueueStats>),
    /// New settings (a configuration reload): attempts already running keep their copy.
    Reconfigure(Box<SchedulerConfig>),
}

/// The handle sessions use to queue messages.
#[derive(Clone)]
pub struct QueueHandle {
    spool: Arc<Spool>,
    tx: mpsc::UnboundedSender<Event>,
    heartbeat: Arc<Heartbeat>,
    /// The scheduler's transport, for the deliveries made before the acknowledgement.
    direct: Arc<dyn Direct>,
}

impl std::fmt::Debug for QueueHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueHandle")
            .field("spool", &self.spool)
            .finish_non_exhaustive()
    }
}

/// The most a delivery before the acknowledgement writes (message size × recipients): a
/// larger one is queued first, so that the client does not wait for many copies of a big
/// message, and the blocking pool writes the spool file.
const IMMEDIATE_LIMIT: usize = 4 * 1024 * 1024;

/// An attempt's outcomes, boxed (the future of [`Direct::deliver`]).
type Outcomes<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Vec<(usize, Outcome)>> + Send + 'a>>;

/// The transport as the handle uses it: [`Transport`] without its type, for the deliveries
/// made in the session's task before the `250`.
trait Direct: Send + Sync {
    fn immediate(&self, envelope: &Envelope) -> bool;
    fn agent(&self, envelope: &Envelope, rcpt: usize) -> &'static str;
    fn deliver<'a>(&'a self, job: &'a DeliveryJob) -> Outcomes<'a>;
}

impl<T: Transport> Direct for Arc<T> {
    fn immediate(&self, envelope: &Envelope) -> bool {
        (**self).immediate(envelope)
    }

    fn agent(&self, envelope: &Envelope, rcpt: usize) -> &'static str {
        (**self).agent(envelope, rcpt)
    }

    fn deliver<'a>(&'a self, job: &'a DeliveryJob) -> Outcomes<'a> {
        Box::pin((**self).deliver_immediate(job))
    }
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::New(m) => write!(f, "New({})", m.id),
            Event::Done(id, _) => write!(f, "Done({id})"),
            Event::Flush => f.write_str("Flush"),
            Event::Admin(a, _) => write!(f, "Admin({a})"),
            Event::Stats(_) => f.write_str("Stats"),
            Event::Reconfigure(_) => f.write_str("Reconfigure"),
        }
    }
}

impl QueueHandle {
    /// An unnamed file in the spool directory for a large message's content while it
    /// arrives ([`Spool::spill_file`]).
    pub fn spill_file(&self) -> io::Result<std::fs::File> {
        self.spool.spill_file()
    }

    /// Stores a message durably, then schedules it. Returns its ID once it is durable.
    pub async fn submit(&self, envelope: Envelope, body: Vec<u8>) -> io::Result<QueueId> {
        self.submit_then(envelope, body, |_| {}).await
    }

    /// Like [`QueueHandle::submit`], calling `queued` with the ID as soon as the message is
    /// durable and before any of its deliveries is logged (the session's "queued" line).
    ///
    /// When the transport can deliver every recipient at once ([`Transport::immediate`]:
    /// local Maildirs) and no recipient asked for a success notification, the message is
    /// delivered here, before the acknowledgement, and no spool file is written: the
    /// delivery is durable (file flushed, renamed into `new/`, rename flushed) before this
    /// returns, so the client's `250` still means "on stable storage", now where the
    /// message belongs. The recipients that were not delivered (a full disk, a folder that
    /// cannot be written) are spooled with the others marked done, and the scheduler takes
    /// them from there: they are retried or bounced as usual.
    ///
    /// A large message written to a file while it arrived ([`MessageBody::Spilled`]) is
    /// always spooled, copied from that file in blocks.
    pub async fn submit_then(
        &self,
        envelope: Envelope,
        body: impl Into<MessageBody>,
        queued: impl FnOnce(QueueId) + Send,
    ) -> io::Result<QueueId> {
        let body = match body.into() {
            MessageBody::Memory(v) => v,
            spilled => {
                let msg = self.spool.put_body(envelope, spilled).await?;
                let id = msg.id;
                queued(id);
                let _ = self.tx.send(Event::New(msg));
                return Ok(id);
            }
        };
        if body.len().saturating_mul(envelope.rcpts.len()) <= IMMEDIATE_LIMIT
            && self.direct.immediate(&envelope)
            && !envelope
                .rcpts
                .iter()
                .any(|r| crate::dsn::wants_dsn(r.params.notify, crate::dsn::DsnAction::Delivered))
        {
            return self.deliver_now(envelope, body, queued).await;
        }
        let msg = self.spool.put(envelope, body).await?;
        let id = msg.id;
        queued(id);
        let _ = self.tx.send(Event::New(msg));
        Ok(id)
    }

    /// The delivery before the acknowledgement ([`QueueHandle::submit_then`]).
    async fn deliver_now(
        &self,
        envelope: Envelope,
        body: Vec<u8>,
        queued: impl FnOnce(QueueId) + Send,
    ) -> io::Result<QueueId> {
        let (id, arrival, content) = self.spool.prepare(&envelope, &body);
        drop(body);
        let n = envelope.rcpts.len();
        let job = DeliveryJob {
            id,
            envelope,
            content,
            rcpts: (0..n).collect(),
            recovered: false,
            fresh: true,
        };
        let outcomes = self.direct.deliver(&job).await;
        // Every recipient was attempted once: a later attempt looks for a delivery this one
        // may have made before it failed (a rename done, its flush failed).
        let mut status = vec![
            RcptStatus {
                attempts: 1,
                ..RcptStatus::pending()
            };
            n
        ];
        let mut done: Vec<(usize, String)> = Vec::with_capacity(n);
        let mut failed: Vec<(usize, Failure)> = Vec::new();
        for (i, outcome) in outcomes {
            let Some(s) = status.get_mut(i) else { continue };
            if s.state != RcptState::Pending {
                continue;
            }
            match outcome {
                Outcome::Delivered(detail) | Outcome::Relayed { detail, .. } => {
                    s.state = RcptState::Delivered;
                    done.push((i, detail));
                }
                Outcome::TempFail(f) | Outcome::PermFail(f) => {
                    s.last_error = Some(f.to_string());
                    failed.push((i, f));
                }
            }
        }
        let DeliveryJob {
            envelope, content, ..
        } = job;
        let log_delivered = |done: &[(usize, String)]| {
            for (i, detail) in done {
                let to = &envelope.rcpts[*i].path;
                let agent = self.direct.agent(&envelope, *i);
                tracing::info!(target: "estafeta::maillog", id = %id, to = %to, status = "sent", delay_s = 0, transport = agent, %detail, "delivered");
            }
        };
        let all = done.len() == n;
        let rest = if all {
            queued(id);
            None
        } else {
            // What was not delivered goes to the spool, the rest marked done; this attempt's
            // failures are the scheduler's to retry or bounce (at once: it is due now).
            let put = self
                .spool
                .put_prepared(id, arrival, envelope.clone(), content, status)
                .await;
            let msg = match put {
                Ok(msg) => msg,
                Err(e) => {
                    // Not acknowledged: the client sends the message again, and the
                    // recipients delivered here get it twice. Their copies are logged.
                    log_delivered(&done);
                    tracing::error!(target: "estafeta::maillog", id = %id, delivered = done.len(), nrcpt = n, error = %e, "not acknowledged: delivered to some recipients, the others could not be queued");
                    return Err(e);
                }
            };
            queued(id);
            Some(msg)
        };
        log_delivered(&done);
        for (i, f) in &failed {
            let to = &envelope.rcpts[*i].path;
            let agent = self.direct.agent(&envelope, *i);
            tracing::info!(target: "estafeta::maillog", id = %id, to = %to, status = "deferred", delay_s = 0, transport = agent, dsn = f.reply.status.map(tracing::field::display), relay = f.remote.as_deref(), reason = %f, "deferred");
        }
        match rest {
            None => tracing::info!(target: "estafeta::maillog", id = %id, "removed"),
            Some(msg) => {
                let _ = self.tx.send(Event::New(msg));
            }
        }
        Ok(id)
    }

    /// Stores a message durably and held (a milter's quarantine): it is kept, visible in
    /// `estafeta queue list`, and never attempted until `estafeta queue release`.
    pub async fn submit_held(
        &self,
        envelope: Envelope,
        body: impl Into<MessageBody>,
    ) -> io::Result<QueueId> {
        let msg = self.spool.put_held(envelope, body.into()).await?;
        let id = msg.id;
        let _ = self.tx.send(Event::New(msg));
        Ok(id)
    }

    /// Asks the scheduler to try every deferred message now.
    pub fn flush(&self) {
        let _ = self.tx.send(Event::Flush);
    }

    /// Carries out an administrative action in the scheduler's loop and reports what it did.
    /// Fails only when the scheduler has stopped.
    pub async fn admin(&self, action: AdminAction) -> io::Result<AdminReport> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Event::Admin(action, reply))
            .map_err(|_| io::Error::other("the scheduler has stopped"))?;
        answer
            .await
            .map_err(|_| io::Error::other("the scheduler has stopped"))
    }

    /// Attempts now every waiting message with a pending recipient in `domain` (ETRN,
    /// `queue flush --domain`), whatever its retry schedule; held messages stay held. Returns
    /// how many it started (messages already due or being delivered are not counted). Fails
    /// only when the scheduler has stopped.
    pub async fn flush_domain(&self, domain: &str) -> io::Result<usize> {
        self.admin(AdminAction::Flush(Selection::Domain(domain.to_string())))
            .await
            .map(|r| r.done.len())
    }

    /// A snapshot of the queue (sizes, the oldest message), taken in the scheduler's loop.
    /// Fails only when the scheduler has stopped.
    pub async fn stats(&self) -> io::Result<QueueStats> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(Event::Stats(reply))
            .map_err(|_| io::Error::other("the scheduler has stopped"))?;
        answer
            .await
            .map_err(|_| io::Error::other("the scheduler has stopped"))
    }

    /// The time since the scheduler's loop last turned. The loop turns at every event and at
    /// least every [`TICK`] when idle; it awaits nothing long but its own spool writes, so a
    /// value well over [`TICK`] means it is wedged (or stopped). For the systemd watchdog.
    pub fn last_turn(&self) -> Duration {
        self.heartbeat.since()
    }

    /// Replaces the scheduler's settings (a live reload of `[queue]`): retry schedule,
    /// lifetime, delay warning, concurrency limits, double-bounce address, hostname. Attempts
    /// already running keep the settings they started with; a message already waiting keeps
    /// the retry time it was given. Fails only when the scheduler has stopped.
    pub fn reconfigure(&self, cfg: SchedulerConfig) -> io::Result<()> {
        self.tx
            .send(Event::Reconfigure(Box::new(cfg)))
            .map_err(|_| io::Error::other("the scheduler has stopped"))
    }

    /// The spool.
    pub fn spool(&self) -> &Arc<Spool> {
        &self.spool
    }
}

/// Starts the scheduler: recovers the spool, then runs until `shutdown`. Deliveries in flight
/// at shutdown finish (the tracker waits for them); nothing new starts.
pub fn start<T: Transport>(
    spool: Arc<Spool>,
    transport: Arc<T>,
    cfg: SchedulerConfig,
    shutdown: CancellationToken,
    tracker: &TaskTracker,
) -> io::Result<QueueHandle> {
    // One writer per spool: held until the loop has stopped and every attempt has returned
    // (a second server, or `estafeta queue` editing offline, is refused meanwhile).
    let lock = spool.lock()?;
    let recovered = spool.recover()?;
    if !recovered.is_empty() {
        tracing::info!(
            messages = recovered.len(),
            "recovered messages from the spool"
        );
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let heartbeat = Arc::new(Heartbeat::new());
    let handle = QueueHandle {
        spool: spool.clone(),
        tx: tx.clone(),
        heartbeat: heartbeat.clone(),
        direct: Arc::new(transport.clone()),
    };
    let sched = Scheduler {
        spool,
        transport,
        cfg,
        tx,
        tracker: tracker.clone(),
        ready: VecDeque::new(),
        waiting: BinaryHeap::new(),
        parked: HashMap::new(),
        held: HashMap::new(),
        in_flight: 0,
        in_flight_ids: HashMap::new(),
        on_return: HashMap::new(),
        per_destination: HashMap::new(),
        holding: HashMap::new(),
        blocked: HashMap::new(),
        heartbeat,
        _lock: lock,
    };
    tracker.spawn(sched.run(rx, recovered, shutdown));
    Ok(handle)
}

struct Scheduler<T> {
    spool: Arc<Spool>,
    transport: Arc<T>,
    cfg: SchedulerConfig,
    tx: mpsc::UnboundedSender<Event>,
    tracker: TaskTracker,
    /// Due now, in arrival order.
    ready: VecDeque<QueuedMessage>,
    /// Waiting for a retry: (due, id), earliest first; the messages are in `parked` with the
    /// same due time (an entry whose time differs is stale: the message was taken out).
    waiting: BinaryHeap<Reverse<(Instant, QueueId)>>,
    parked: HashMap<QueueId, (Instant, QueuedMessage)>,
    /// Held by the operator: never attempted until released.
    held: HashMap<QueueId, QueuedMessage>,
    in_flight: usize,
    /// The messages being attempted right now, with their arrival time and pending
    /// recipients when the attempt started (for [`QueueStats`]).
    in_flight_ids: HashMap<QueueId, (u64, usize)>,
    /// What the operator asked for a message while it was being attempted, done when the
    /// attempt returns (a message is never removed under the transport's feet).
    on_return: HashMap<QueueId, AfterAttempt>,
    /// Attempts in flight per destination.
    per_destination: HashMap<String, usize>,
    /// Due messages waiting for a destination at its limit, oldest first: one comes back to
    /// the front of `ready` each time an attempt to that destination returns.
    blocked: HashMap<String, VecDeque<QueuedMessage>>,
    /// The destinations each attempt in flight holds.
    holding: HashMap<QueueId, Vec<String>>,
    /// Where the loop records each turn.
    heartbeat: Arc<Heartbeat>,
    /// The spool's lock ([`Spool::lock`]), released when the scheduler is dropped.
    _lock: std::fs::File,
}

/// An administrative action postponed until the attempt in flight returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterAttempt {
    Hold,
    Delete,
    Bounce,
}

impl<T: Transport> Scheduler<T> {
    async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<Event>,
        recovered: Vec<QueuedMessage>,
        shutdown: CancellationToken,
    ) {
        for m in recovered {
            self.schedule(m);
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One timer for the earliest retry, moved only when that changes (not registered
        // again at every event).
        let sleep = tokio::time::sleep_until(Instant::now());
        tokio::pin!(sleep);
        let mut armed = None;
        loop {
            self.heartbeat.beat();
            self.dispatch();
            let next_due = self.waiting.peek().map(|Reverse((t, _))| *t);
            if let Some(t) = next_due
                && armed != Some(t)
            {
                sleep.as_mut().reset(t);
                armed = Some(t);
            }
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                // What is due first, so that an event (a stats request on paused time, a
                // flood of submissions) never finds a due message still parked.
                () = &mut sleep, if next_due.is_some() => {
                    armed = None;
                    let now = Instant::now();
                    while let Some(Reverse((t, id))) = self.waiting.peek().copied() {
                        if t > now {
                            break;
                        }
                        self.waiting.pop();
                        if self.parked.get(&id).is_some_and(|(due, _)| *due == t)
                            && let Some((_, m)) = self.parked.remove(&id)
                        {
                            self.ready.push_back(m);
                        }
                    }
                }
                ev = rx.recv() => match ev {
                    None => break,
                    Some(Event::New(m)) => self.schedule(m),
                    Some(Event::Done(id, m)) => self.done(id, m, true).await,
                    Some(Event::Flush) => {
                        self.flush(&Selection::All);
                    }
                    Some(Event::Admin(action, reply)) => {
                        let report = self.admin(action).await;
                        let _ = reply.send(report);
                    }
                    Some(Event::Stats(reply)) => {
                        let _ = reply.send(self.stats());
                    }
                    Some(Event::Reconfigure(cfg)) => {
                        tracing::info!("queue settings reloaded");
                        let clock = self.cfg.clock;
                        self.cfg = SchedulerConfig { clock, ..*cfg };
                    }
                },
                // Turns the loop when idle: the heartbeat stays fresh.
                _ = tick.tick() => {}
            }
        }
        // Nothing new starts; the attempts still running are waited for (as long as the
        // server's grace allows), so that what the operator asked for them (hold, delete,
        // bounce) is carried out and recorded before the spool is let go.
        while self.in_flight > 0 {
            match rx.recv().await {
                None => break,
                Some(Event::Done(id, m)) => self.done(id, m, false).await,
                // Answered "the scheduler has stopped".
                Some(Event::Admin(_, reply)) => drop(reply),
                Some(Event::Stats(reply)) => drop(reply),
                Some(_) => {}
            }
        }
        tracing::debug!(in_flight = self.in_flight, "scheduler stopped");
    }

    /// An attempt returned: the message comes back with its new state (None: it is done).
    /// `running`: false while stopping (the message is not scheduled again; its state is on
    /// disk).
    async fn done(&mut self, id: QueueId, m: Option<QueuedMessage>, running: bool) {
        self.in_flight -= 1;
        self.in_flight_ids.remove(&id);
        let after = self.on_return.remove(&id);
        for d in self.holding.remove(&id).unwrap_or_default() {
            if let Some(n) = self.per_destination.get_mut(&d) {
                *n -= 1;
                if *n == 0 {
                    self.per_destination.remove(&d);
                }
            }
        }
        let Some(m) = m else { return };
        match after {
            // While stopping too: a bounce is one more task, waited for like an attempt.
            Some(after) => self.act_on(after, m).await,
            None if running => self.schedule(m),
            None => {}
        }
    }

    /// Puts a message where it belongs: ready now, or waiting for its next attempt.
    fn schedule(&mut self, m: QueuedMessage) {
        let now = self.cfg.clock.unix_now();
        if m.held {
            self.held.insert(m.id, m);
        } else if m.next_attempt <= now {
            self.ready.push_back(m);
        } else {
            let due = Instant::now() + Duration::from_secs(m.next_attempt - now);
            self.waiting.push(Reverse((due, m.id)));
            self.parked.insert(m.id, (due, m));
        }
    }

    /// Takes a message that is not being attempted out of wherever it waits.
    fn take(&mut self, id: QueueId) -> Option<QueuedMessage> {
        if let Some(pos) = self.ready.iter().position(|m| m.id == id) {
            return self.ready.remove(pos);
        }
        if let Some((_, m)) = self.parked.remove(&id) {
            return Some(m);
        }
        for q in self.blocked.values_mut() {
            if let Some(pos) = q.iter().position(|m| m.id == id) {
                return q.remove(pos);
            }
        }
        self.held.remove(&id)
    }

    /// Moves the selected waiting messages to the ready queue; returns the messages flushed
    /// (including those already due or in flight) and the held ones left alone.
    fn flush(&mut self, sel: &Selection) -> (Vec<QueueId>, Vec<QueueId>) {
        let selected = |m: &QueuedMessage| match sel {
            Selection::All => true,
            Selection::Ids(ids) => ids.contains(&m.id),
            Selection::Domain(d) => has_pending_in(m, d),
        };
        let mut done = Vec::new();
        let due: Vec<QueueId> = self
            .parked
            .values()
            .filter(|(_, m)| selected(m))
            .map(|(_, m)| m.id)
            .collect();
        for id in due {
            if let Some((_, m)) = self.parked.remove(&id) {
                done.push(id);
                self.ready.push_back(m);
            }
        }
        // Already due, or being attempted right now: they go at once anyway, and are reported
        // as flushed. Not for a domain: ETRN answers how many messages it started, and those
        // did not wait for it (docs/smtp.md).
        if !matches!(sel, Selection::Domain(_)) {
            let ready: Vec<QueueId> = self
                .ready
                .iter()
                .chain(self.blocked.values().flatten())
                .filter(|m| selected(m) && !done.contains(&m.id))
                .map(|m| m.id)
                .collect();
            done.extend(ready);
            done.extend(self.in_flight_ids.keys().filter(|id| match sel {
                Selection::Ids(ids) => ids.contains(id),
                _ => true,
            }));
        }
        let skipped = self
            .held
            .values()
            .filter(|m| selected(m))
            .map(|m| m.id)
            .collect();
        done.sort();
        done.dedup();
        (done, skipped)
    }

    async fn admin(&mut self, action: AdminAction) -> AdminReport {
        tracing::info!(action = %action, "queue administration");
        let mut report = AdminReport::default();
        let (ids, after) = match action {
            AdminAction::Flush(sel) => {
                let (done, skipped) = self.flush(&sel);
                if let Selection::Ids(ids) = &sel {
                    report.unknown = ids
                        .iter()
                        .filter(|id| !done.contains(id) && !skipped.contains(id))
                        .copied()
                        .collect();
                }
                report.done = done;
                report.skipped = skipped;
                return report;
            }
            AdminAction::Release(ids) => {
                for id in ids {
                    if let Some(mut m) = self.held.remove(&id) {
                        m.held = false;
                        m.next_attempt = 0;
                        if let Err(e) = self.spool.write_status(&mut m).await {
                            tracing::error!(id = %id, error = %e, "cannot record the release");
                        }
                        tracing::info!(target: "estafeta::maillog", id = %id, "released by the administrator");
                        self.ready.push_back(m);
                        report.done.push(id);
                    } else if self.on_return.get(&id) == Some(&AfterAttempt::Hold) {
                        self.on_return.remove(&id);
                        report.done.push(id);
                    } else if self.is_known(id) {
                        report.done.push(id);
                    } else {
                        report.unknown.push(id);
                    }
                }
                return report;
            }
            AdminAction::Hold(ids) => (ids, AfterAttempt::Hold),
            AdminAction::Delete(ids) => (ids, AfterAttempt::Delete),
            AdminAction::Bounce(ids) => (ids, AfterAttempt::Bounce),
        };
        for id in ids {
            if let Some(m) = self.take(id) {
                self.act_on(after, m).await;
                report.done.push(id);
            } else if self.in_flight_ids.contains_key(&id) {
                // Done when the attempt returns (a delete wins over a hold).
                let entry = self.on_return.entry(id).or_insert(after);
                if after != AfterAttempt::Hold {
                    *entry = after;
                }
                report.done.push(id);
            } else {
                report.unknown.push(id);
            }
        }
        report
    }

    /// Counts what the queue holds, wherever each message waits.
    fn stats(&self) -> QueueStats {
        let mut s = QueueStats {
            held: self.held.len(),
            in_flight: self.in_flight_ids.len(),
            ..QueueStats::default()
        };
        let mut count = |arrival: u64, pending: usize| {
            s.messages += 1;
            s.recipients_pending += pending;
            s.oldest_arrival = Some(s.oldest_arrival.map_or(arrival, |o| o.min(arrival)));
        };
        let waiting = self
            .ready
            .iter()
            .chain(self.parked.values().map(|(_, m)| m))
            .chain(self.held.values())
            .chain(self.blocked.values().flatten());
        for m in waiting {
            let pending = m
                .status
                .iter()
                .filter(|s| s.state == RcptState::Pending)
                .count();
            count(m.arrival, pending);
        }
        for &(arrival, pending) in self.in_flight_ids.values() {
            count(arrival, pending);
        }
        s
    }

    fn is_known(&self, id: QueueId) -> bool {
        self.in_flight_ids.contains_key(&id)
            || self.parked.contains_key(&id)
            || self.held.contains_key(&id)
            || self.ready.iter().any(|m| m.id == id)
            || self.blocked.values().flatten().any(|m| m.id == id)
    }

    /// Holds, deletes or bounces a message that is not being attempted.
    async fn act_on(&mut self, after: AfterAttempt, mut m: QueuedMessage) {
        match after {
            AfterAttempt::Hold => {
                if !m.held {
                    m.held = true;
                    if let Err(e) = self.spool.write_status(&mut m).await {
                        tracing::error!(id = %m.id, error = %e, "cannot record the hold");
                    }
                    tracing::info!(target: "estafeta::maillog", id = %m.id, "held by the administrator");
                }
                self.held.insert(m.id, m);
            }
            AfterAttempt::Delete => match self.spool.remove(&m) {
                Ok(()) => {
                    tracing::info!(target: "estafeta::maillog", id = %m.id, "deleted by the administrator")
                }
                Err(e) => tracing::error!(id = %m.id, error = %e, "cannot remove queue file"),
            },
            AfterAttempt::Bounce => {
                // Like an attempt: counted in flight, so that shutdown waits for it.
                self.in_flight += 1;
                self.in_flight_ids
                    .insert(m.id, (m.arrival, m.pending().len()));
                let spool = self.spool.clone();
                let cfg = self.cfg.clone();
                let tx = self.tx.clone();
                self.tracker.spawn(async move {
                    let id = m.id;
                    bounce_now(&spool, &cfg, Some(&tx), m).await;
                    let _ = tx.send(Event::Done(id, None));
                });
            }
        }
    }

    /// Starts ready messages, oldest first, while there is room in total; a message whose
    /// destination is at its limit waits in place and later ones go first.
    fn dispatch(&mut self) {
        let limit = self.cfg.max_per_destination.max(1);
        // Destinations with room again (an attempt returned, a message was taken away by the
        // operator): their oldest waiting messages go first.
        let count = |s: &Self, d: &str| s.per_destination.get(d).copied().unwrap_or(0);
        let free: Vec<String> = self
            .blocked
            .keys()
            .filter(|d| count(self, d) < limit)
            .cloned()
            .collect();
        for d in free {
            let room = limit - count(self, &d);
            if let Some(q) = self.blocked.get_mut(&d) {
                let back: Vec<QueuedMessage> = q.drain(..room.min(q.len())).collect();
                if q.is_empty() {
                    self.blocked.remove(&d);
                }
                for m in back.into_iter().rev() {
                    self.ready.push_front(m);
                }
            }
        }
        while self.in_flight < self.cfg.max_deliveries {
            let Some(m) = self.ready.pop_front() else {
                break;
            };
            let dests = self.transport.destinations(&m.envelope, &m.pending());
            if let Some(busy) = dests
                .iter()
                .find(|d| self.per_destination.get(*d).copied().unwrap_or(0) >= limit)
            {
                // Set aside until an attempt to that destination returns: never looked at
                // again before, so a deep backlog costs nothing per event.
                self.blocked.entry(busy.clone()).or_default().push_back(m);
                continue;
            }
            for d in &dests {
                *self.per_destination.entry(d.clone()).or_insert(0) += 1;
            }
            if !dests.is_empty() {
                self.holding.insert(m.id, dests);
            }
            self.in_flight += 1;
            self.in_flight_ids
                .insert(m.id, (m.arrival, m.pending().len()));
            let spool = self.spool.clone();
            let transport = self.transport.clone();
            let cfg = self.cfg.clone();
            let tx = self.tx.clone();
            self.tracker.spawn(async move {
                let id = m.id;
                let after = attempt(&spool, &*transport, &cfg, &tx, m).await;
                let _ = tx.send(Event::Done(id, after));
            });
        }
    }
}

/// The wait before attempt number `attempts + 1`, with ±10% jitter so that messages deferred
/// together do not all come back at the same instant.
pub fn retry_delay(retry: &[Duration], attempts: u32) -> Duration {
    let base = retry
        .get((attempts as usize).saturating_sub(1))
        .or(retry.last())
        .copied()
        .unwrap_or(Duration::from_secs(300));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // A cheap pseudo-random factor in [0.9, 1.1).
    let factor = 0.9 + f64::from(nanos % 1000) / 5000.0;
    base.mul_f64(factor)
}

/// One attempt for one message: deliver, record the outcome, and return the message if
/// recipients remain pending.
async fn attempt<T: Transport>(
    spool: &Spool,
    transport: &T,
    cfg: &SchedulerConfig,
    tx: &mpsc::UnboundedSender<Event>,
    mut m: QueuedMessage,
) -> Option<QueuedMessage> {
    let retry = (&cfg.retry[..], cfg.clock);
    let pending = m.pending();
    if pending.is_empty() {
        let _ = spool.remove(&m);
        return None;
    }
    let content = match m.content.take() {
        Some(c) => Ok(c),
        None => spool.read_content(m.id),
    };
    let content = match content {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(id = %m.id, error = %e, "cannot read queued message; will retry");
            return defer_all(spool, retry, m, &pending, &e.to_string()).await;
        }
    };
    let job = DeliveryJob {
        id: m.id,
        envelope: m.envelope.clone(),
        content,
        rcpts: pending.clone(),
        recovered: m.recovered,
        fresh: !m.recovered && pending.iter().all(|&i| m.status[i].attempts == 0),
    };
    let (outcomes, notified) =
        deliver_in_batches(spool, transport, cfg, Some(tx), &job, &mut m).await;
    let mut answered = vec![false; m.status.len()];
    let now = cfg.clock.unix_now();
    let delay = now.saturating_sub(m.arrival);
    let mut notices = Notices::default();
    for (i, outcome) in outcomes {
        let Some(status) = m.status.get_mut(i) else {
            continue;
        };
        if status.state != RcptState::Pending || answered[i] {
            continue;
        }
        answered[i] = true;
        status.attempts += 1;
        let to = &m.envelope.rcpts[i].path;
        let agent = transport.agent(&m.envelope, i);
        match &outcome {
            Outcome::Delivered(detail) | Outcome::Relayed { detail, .. } => {
                status.state = RcptState::Delivered;
                status.last_error = None;
                tracing::info!(target: "estafeta::maillog", id = %m.id, to = %to, status = "sent", delay_s = delay, transport = agent, %detail, "delivered");
                if !notified.contains(&i) {
                    notices.success(i, &outcome);
                }
            }
            Outcome::TempFail(f) => {
                status.last_error = Some(f.to_string());
                tracing::info!(target: "estafeta::maillog", id = %m.id, to = %to, status = "deferred", delay_s = delay, transport = agent, dsn = f.reply.status.map(tracing::field::display), relay = f.remote.as_deref(), reason = %f, "deferred");
            }
            Outcome::PermFail(f) => {
                status.state = RcptState::Failed;
                status.last_error = Some(f.to_string());
                tracing::info!(target: "estafeta::maillog", id = %m.id, to = %to, status = "bounced", delay_s = delay, transport = agent, dsn = f.reply.status.map(tracing::field::display), relay = f.remote.as_deref(), reason = %f, "failed");
                let code = f.reply.status.unwrap_or(Status::PERMANENT);
                notices
                    .failed
                    .push((i, code, f.remote.clone(), format!("{}", f.reply)));
            }
        }
    }
    for &i in &pending {
        if !answered[i] {
            let s = &mut m.status[i];
            s.attempts += 1;
            s.last_error = Some(Failure::local(reply::local_error()).to_string());
        }
    }
    // The lifetime is over: what is still pending fails for good (RFC 3463 X.4.7).
    if delay >= cfg.max_lifetime.as_secs() {
        for i in m.pending() {
            let last = m.status[i].last_error.clone().unwrap_or_default();
            m.status[i].state = RcptState::Failed;
            let why = format!(
                "delivery time expired after {}; last error: {last}",
                human(delay)
            );
            tracing::info!(target: "estafeta::maillog", id = %m.id, to = %m.envelope.rcpts[i].path, status = "expired", delay_s = delay, transport = transport.agent(&m.envelope, i), reason = %why, "failed");
            m.status[i].last_error = Some(why.clone());
            notices.failed.push((i, Status::EXPIRED, None, why));
        }
    } else if let Some(warn) = cfg.delay_warning
        && !m.delay_warned
        && delay >= warn.as_secs()
    {
        let until = m.arrival + cfg.max_lifetime.as_secs();
        for i in m.pending() {
            let last = m.status[i].last_error.clone().unwrap_or_default();
            notices.delayed.push((i, Status::TEMPORARY, None, last));
        }
        notices.retry_until = Some(until);
        m.delay_warned = true;
    }
    // Notifications first, then the state that caused them: a crash in between repeats a
    // notification at worst, never loses one.
    send_notices(spool, cfg, Some(tx), &m, &job.content, notices, now).await;
    let remaining = m.pending();
    if remaining.is_empty() {
        if let Err(e) = spool.remove(&m) {
            tracing::error!(id = %m.id, error = %e, "cannot remove queue file");
        } else {
            tracing::info!(target: "estafeta::maillog", id = %m.id, "removed");
        }
        return None;
    }
    schedule_retry(&mut m, &remaining, retry);
    if let Err(e) = spool.write_status(&mut m).await {
        tracing::error!(id = %m.id, error = %e, "cannot record delivery state");
    }
    Some(m)
}

/// The protocol recorded in the envelope of the notifications this server writes.
const NOTICE_PROTOCOL: &str = "local";

/// The notifications an attempt produced: (recipient index, status code, remote host,
/// diagnostic) for each kind.
#[derive(Default)]
struct Notices {
    failed: Vec<(usize, Status, Option<String>, String)>,
    delayed: Vec<(usize, Status, Option<String>, String)>,
    delivered: Vec<(usize, Status, Option<String>, String)>,
    relayed: Vec<(usize, Status, Option<String>, String)>,
    retry_until: Option<u64>,
}

impl Notices {
    /// The success report a successful `outcome` for recipient `i` calls for (NOTIFY decides
    /// later whether it is sent): "delivered" for a final delivery, "relayed" to a server
    /// without DSN; none when the next server got NOTIFY and reports itself (RFC 3461
    /// §5.2.2).
    fn success(&mut self, i: usize, outcome: &Outcome) {
        match outcome {
            Outcome::Delivered(detail) => {
                self.delivered
                    .push((i, Status::SUCCESS, None, detail.clone()))
            }
            Outcome::Relayed {
                detail,
                dsn_passed: false,
            } => self
                .relayed
                .push((i, Status::SUCCESS, None, detail.clone())),
            _ => {}
        }
    }
}

fn human(secs: u64) -> String {
    match secs {
        s if s >= 86_400 => format!("{}d", s / 86_400),
        s if s >= 3_600 => format!("{}h", s / 3_600),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// Builds and queues the delivery status notifications (RFC 3464) an attempt calls for,
/// honouring NOTIFY, RET, ENVID and ORCPT (RFC 3461). A message from `<>` is never answered
/// (no bounce of a bounce): that is logged instead.
async fn send_notices(
    spool: &Spool,
    cfg: &SchedulerConfig,
    tx: Option<&mpsc::UnboundedSender<Event>>,
    m: &QueuedMessage,
    content: &crate::spool::Content,
    notices: Notices,
    now: u64,
) {
    use crate::dsn::{DsnAction, DsnInput, DsnRecipient, build_dsn, may_bounce, wants_dsn};
    let groups = [
        (DsnAction::Failed, notices.failed),
        (DsnAction::Delayed, notices.delayed),
        (DsnAction::Delivered, notices.delivered),
        (DsnAction::Relayed, notices.relayed),
    ];
    for (action, list) in groups {
        let recipients: Vec<DsnRecipient> = list
            .into_iter()
            .filter(|(i, ..)| wants_dsn(m.envelope.rcpts[*i].params.notify, action))
            .map(|(i, status, remote, diagnostic)| {
                let r = &m.envelope.rcpts[i];
                DsnRecipient {
                    final_recipient: r.path.to_string(),
                    original_recipient: r.params.orcpt.as_ref().map(|o| o.address()),
                    action,
                    status,
                    remote_mta: remote.map(|h| format!("dns; {h}")),
                    diagnostic: Some(format!("smtp; {diagnostic}")),
                    last_attempt: Some(now),
                    will_retry_until: if action == DsnAction::Delayed {
                        notices.retry_until
                    } else {
                        None
                    },
                }
            })
            .collect();
        if recipients.is_empty() {
            continue;
        }
        // A message from <> is never answered to its sender (RFC 5321 §4.5.5). A failed one
        // may go to the postmaster — unless it is already such a report (ours, from <>, to
        // the postmaster), which would loop.
        let to = if may_bounce(&m.envelope.from) {
            match &m.envelope.from {
                estafeta_proto::ReversePath::Mailbox(mb) => mb.clone(),
                estafeta_proto::ReversePath::Null => continue,
            }
        } else {
            let ours = m.envelope.client.protocol == NOTICE_PROTOCOL;
            match &cfg.double_bounce_to {
                Some(pm)
                    if action == DsnAction::Failed
                        && !(ours && m.envelope.rcpts.iter().any(|r| &r.path.mailbox == pm)) =>
                {
                    tracing::info!(target: "estafeta::maillog", id = %m.id, to = %pm, "undeliverable notification: reported to the postmaster");
                    pm.clone()
                }
                _ => {
                    tracing::info!(target: "estafeta::maillog", id = %m.id, "no notification: the message is itself a notification (null sender)");
                    continue;
                }
            }
        };
        let envid = m
            .envelope
            .params
            .envid
            .as_deref()
            .map(|e| estafeta_proto::command::xtext_decode(e).unwrap_or_else(|| e.to_string()));
        let sender = to.to_string();
        let id = m.id.to_string();
        let bytes = build_dsn(&DsnInput {
            reporting_mta: &cfg.hostname,
            queue_id: &id,
            envid: envid.as_deref(),
            arrival: m.arrival,
            now,
            sender: &sender,
            recipients: &recipients,
            original: content.as_bytes(),
            // RFC 3461 §4.3: only failure reports return the whole message; never one that
            // asked for REQUIRETLS (RFC 8689 §5: its report carries the headers only).
            return_full: action == DsnAction::Failed
                && m.envelope.params.ret == Some(estafeta_proto::Ret::Full)
                && !m.envelope.params.requiretls,
            max_returned: cfg.max_returned,
            boundary_seed: now ^ m.id.as_u64(),
        });
        let envelope = estafeta_proto::Envelope {
            client: estafeta_proto::ClientInfo {
                ip: std::net::IpAddr::from([127, 0, 0, 1]),
                port: 0,
                helo: cfg.hostname.clone(),
                protocol: NOTICE_PROTOCOL.into(),
                tls: None,
                auth: None,
                local_uid: None,
                name: None,
            },
            from: estafeta_proto::ReversePath::Null,
            // The report of a REQUIRETLS message travels under REQUIRETLS too (RFC 8689 §5).
            params: estafeta_proto::MailParams {
                requiretls: m.envelope.params.requiretls,
                ..Default::default()
            },
            rcpts: vec![estafeta_proto::Recipient {
                path: estafeta_proto::ForwardPath {
                    mailbox: to,
                    bare_postmaster: false,
                    source_route: Vec::new(),
                },
                params: estafeta_proto::RcptParams::default(),
            }],
        };
        match spool.put(envelope, bytes).await {
            Ok(notice) => {
                tracing::info!(target: "estafeta::maillog", id = %m.id, notification = %notice.id, to = %sender, kind = ?action, "notification queued");
                // Without a scheduler (offline), the next start finds it in the spool.
                if let Some(tx) = tx {
                    let _ = tx.send(Event::New(notice));
                }
            }
            Err(e) => {
                tracing::error!(id = %m.id, error = %e, "cannot queue the delivery status notification");
            }
        }
    }
}

/// Returns a message to its sender on the operator's word: every pending recipient fails
/// (5.0.0), the usual failure notification goes through the same path as after an attempt
/// (NOTIFY and RET honoured, none for the null sender), then the message is removed. With
/// `tx` None (no scheduler running), the notification waits in the spool for the next start.
pub(crate) async fn bounce_now(
    spool: &Spool,
    cfg: &SchedulerConfig,
    tx: Option<&mpsc::UnboundedSender<Event>>,
    mut m: QueuedMessage,
) {
    let content = match m.content.take() {
        Some(c) => c,
        None => spool.read_content(m.id).unwrap_or_else(|e| {
            tracing::error!(id = %m.id, error = %e, "cannot read the message; bouncing without it");
            crate::spool::Content::from_vec(Vec::new())
        }),
    };
    let why = Failure::local(reply::bounced_by_administrator());
    let text = why.to_string();
    let now = cfg.clock.unix_now();
    let mut notices = Notices::default();
    for i in m.pending() {
        m.status[i].state = RcptState::Failed;
        m.status[i].last_error = Some(text.clone());
        tracing::info!(target: "estafeta::maillog", id = %m.id, to = %m.envelope.rcpts[i].path, status = "bounced", delay_s = now.saturating_sub(m.arrival), reason = %text, "failed");
        notices
            .failed
            .push((i, Status::PERMANENT, None, text.clone()));
    }
    send_notices(spool, cfg, tx, &m, &content, notices, now).await;
    match spool.remove(&m) {
        Ok(()) => tracing::info!(target: "estafeta::maillog", id = %m.id, "removed"),
        Err(e) => tracing::error!(id = %m.id, error = %e, "cannot remove queue file"),
    }
}

async fn defer_all(
    spool: &Spool,
    retry: (&[Duration], Clock),
    mut m: QueuedMessage,
    pending: &[usize],
    why: &str,
) -> Option<QueuedMessage> {
    for &i in pending {
        m.status[i].attempts += 1;
        m.status[i].last_error = Some(why.to_string());
    }
    schedule_retry(&mut m, pending, retry);
    let _ = spool.write_status(&mut m).await;
    Some(m)
}

/// Sets the next attempt of `m` from the retry schedule, by the most attempts any of its
/// `pending` recipients has had.
fn schedule_retry(m: &mut QueuedMessage, pending: &[usize], (retry, clock): (&[Duration], Clock)) {
    let attempts = pending
        .iter()
        .map(|&i| m.status[i].attempts)
        .max()
        .unwrap_or(1);
    m.next_attempt = clock.unix_now() + retry_delay(retry, attempts).as_secs().max(1);
}

/// Delivers `job` batch by batch ([`Transport::batches`]). After each batch but the last, the
/// recipients it delivered are recorded durably, in a copy of `m`'s state (the caller records
/// every outcome as usual afterwards): a crash during a later batch then does not deliver them
/// again. Their success notifications (NOTIFY=SUCCESS) are queued before that record, and
/// their indices returned so that they are not queued twice. Failures are not recorded early:
/// their notification is queued first, with the others, at the end.
async fn deliver_in_batches<T: Transport>(
    spool: &Spool,
    transport: &T,
    cfg: &SchedulerConfig,
    tx: Option<&mpsc::UnboundedSender<Event>>,
    job: &DeliveryJob,
    m: &mut QueuedMessage,
) -> (Vec<(usize, Outcome)>, Vec<usize>) {
    let batches = transport.batches(job);
    if batches.len() <= 1 {
        return (transport.deliver(job).await, Vec::new());
    }
    let mut notified = Vec::new();
    let mut progress = QueuedMessage {
        content: None,
        ..m.clone()
    };
    let mut outcomes = Vec::new();
    let last = batches.len() - 1;
    for (n, rcpts) in batches.into_iter().enumerate() {
        if rcpts.is_empty() {
            continue;
        }
        let part = DeliveryJob {
            id: job.id,
            envelope: job.envelope.clone(),
            content: job.content.clone(),
            rcpts,
            recovered: job.recovered,
            fresh: job.fresh,
        };
        let got = transport.deliver(&part).await;
        let mut delivered = false;
        let mut notices = Notices::default();
        for (i, outcome) in &got {
            let done = matches!(outcome, Outcome::Delivered(_) | Outcome::Relayed { .. });
            if let (true, Some(s)) = (done, progress.status.get_mut(*i)) {
                s.state = RcptState::Delivered;
                s.attempts += 1;
                delivered = true;
                notices.success(*i, outcome);
            }
        }
        if n < last && delivered {
            // Notifications first, then the state that caused them.
            notified.extend(notices.delivered.iter().map(|n| n.0));
            notified.extend(notices.relayed.iter().map(|n| n.0));
            send_notices(
                spool,
                cfg,
                tx,
                m,
                &job.content,
                notices,
                cfg.clock.unix_now(),
            )
            .await;
            if let Err(e) = spool.write_status(&mut progress).await {
                tracing::error!(id = %m.id, error = %e, "cannot record delivery state");
            }
            m.has_status_file |= progress.has_status_file;
        }
        outcomes.extend(got);
    }
    (outcomes, notified)
}
