//! The scheduler: one event loop that hands due messages to the transport, with a cap on
//! concurrent deliveries, and retries on schedule. Not a task per message: a message waiting
//! for its retry is an entry in a heap, and the loop sleeps exactly until the next one is due.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use estafeta_proto::Envelope;
use estafeta_proto::reply;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::id::QueueId;
use crate::spool::{QueuedMessage, RcptState, Spool, unix_now};
use crate::transport::{DeliveryJob, Failure, Outcome, Transport};

/// The scheduler's settings.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Deliveries in flight at once, in total.
    pub max_deliveries: usize,
    /// Waits between attempts; the last one repeats.
    pub retry: Vec<Duration>,
}

enum Event {
    /// A message was just accepted.
    New(QueuedMessage),
    /// An attempt finished; the message comes back with its new state (None: it is done).
    Done(QueueId, Option<QueuedMessage>),
    /// Try every waiting message now.
    Flush,
}

/// The handle sessions use to queue messages.
#[derive(Clone, Debug)]
pub struct QueueHandle {
    spool: Arc<Spool>,
    tx: mpsc::UnboundedSender<Event>,
}

impl std::fmt::Debug for Event {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Event::New(m) => write!(f, "New({})", m.id),
            Event::Done(id, _) => write!(f, "Done({id})"),
            Event::Flush => f.write_str("Flush"),
        }
    }
}

impl QueueHandle {
    /// Stores a message durably, then schedules it. Returns its ID once it is durable.
    pub async fn submit(&self, envelope: Envelope, body: Vec<u8>) -> io::Result<QueueId> {
        let msg = self.spool.put(envelope, body).await?;
        let id = msg.id;
        let _ = self.tx.send(Event::New(msg));
        Ok(id)
    }

    /// Asks the scheduler to try every deferred message now.
    pub fn flush(&self) {
        let _ = self.tx.send(Event::Flush);
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
    let recovered = spool.recover()?;
    if !recovered.is_empty() {
        tracing::info!(
            messages = recovered.len(),
            "recovered messages from the spool"
        );
    }
    let (tx, rx) = mpsc::unbounded_channel();
    let handle = QueueHandle {
        spool: spool.clone(),
        tx: tx.clone(),
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
        in_flight: 0,
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
    /// Waiting for a retry: (due, id), earliest first; the messages are in `parked`.
    waiting: BinaryHeap<Reverse<(Instant, QueueId)>>,
    parked: HashMap<QueueId, QueuedMessage>,
    in_flight: usize,
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
        loop {
            self.dispatch();
            let next_due = self.waiting.peek().map(|Reverse((t, _))| *t);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                ev = rx.recv() => match ev {
                    None => break,
                    Some(Event::New(m)) => self.ready.push_back(m),
                    Some(Event::Done(_, m)) => {
                        self.in_flight -= 1;
                        if let Some(m) = m {
                            self.schedule(m);
                        }
                    }
                    Some(Event::Flush) => {
                        while let Some(Reverse((_, id))) = self.waiting.pop() {
                            if let Some(m) = self.parked.remove(&id) {
                                self.ready.push_back(m);
                            }
                        }
                    }
                },
                _ = sleep_until(next_due), if next_due.is_some() => {
                    let now = Instant::now();
                    while let Some(Reverse((t, id))) = self.waiting.peek().copied() {
                        if t > now {
                            break;
                        }
                        self.waiting.pop();
                        if let Some(m) = self.parked.remove(&id) {
                            self.ready.push_back(m);
                        }
                    }
                }
            }
        }
        tracing::debug!(in_flight = self.in_flight, "scheduler stopped");
    }

    /// Puts a message where it belongs: ready now, or waiting for its next attempt.
    fn schedule(&mut self, m: QueuedMessage) {
        let now = unix_now();
        if m.next_attempt <= now {
            self.ready.push_back(m);
        } else {
            let due = Instant::now() + Duration::from_secs(m.next_attempt - now);
            self.waiting.push(Reverse((due, m.id)));
            self.parked.insert(m.id, m);
        }
    }

    fn dispatch(&mut self) {
        while self.in_flight < self.cfg.max_deliveries {
            let Some(m) = self.ready.pop_front() else {
                break;
            };
            self.in_flight += 1;
            let spool = self.spool.clone();
            let transport = self.transport.clone();
            let retry = self.cfg.retry.clone();
            let tx = self.tx.clone();
            self.tracker.spawn(async move {
                let id = m.id;
                let after = attempt(&spool, &*transport, &retry, m).await;
                let _ = tx.send(Event::Done(id, after));
            });
        }
    }
}

async fn sleep_until(t: Option<Instant>) {
    if let Some(t) = t {
        tokio::time::sleep_until(t.into()).await;
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
    retry: &[Duration],
    mut m: QueuedMessage,
) -> Option<QueuedMessage> {
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
    };
    let outcomes = transport.deliver(&job).await;
    let mut answered = vec![false; m.status.len()];
    let delay = unix_now().saturating_sub(m.arrival);
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
        match outcome {
            Outcome::Delivered(detail) => {
                status.state = RcptState::Delivered;
                status.last_error = None;
                tracing::info!(target: "estafeta::maillog", id = %m.id, to = %to, status = "sent", delay_s = delay, %detail, "delivered");
            }
            Outcome::TempFail(f) => {
                status.last_error = Some(f.to_string());
                tracing::info!(target: "estafeta::maillog", id = %m.id, to = %to, status = "deferred", delay_s = delay, reason = %f, "deferred");
            }
            Outcome::PermFail(f) => {
                status.state = RcptState::Failed;
                status.last_error = Some(f.to_string());
                tracing::info!(target: "estafeta::maillog", id = %m.id, to = %to, status = "bounced", delay_s = delay, reason = %f, "failed");
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
    let remaining = m.pending();
    if remaining.is_empty() {
        if let Err(e) = spool.remove(&m) {
            tracing::error!(id = %m.id, error = %e, "cannot remove queue file");
        } else {
            tracing::info!(target: "estafeta::maillog", id = %m.id, "removed");
        }
        return None;
    }
    let attempts = remaining
        .iter()
        .map(|&i| m.status[i].attempts)
        .max()
        .unwrap_or(1);
    m.next_attempt = unix_now() + retry_delay(retry, attempts).as_secs().max(1);
    if let Err(e) = spool.write_status(&mut m).await {
        tracing::error!(id = %m.id, error = %e, "cannot record delivery state");
    }
    Some(m)
}

async fn defer_all(
    spool: &Spool,
    retry: &[Duration],
    mut m: QueuedMessage,
    pending: &[usize],
    why: &str,
) -> Option<QueuedMessage> {
    for &i in pending {
        m.status[i].attempts += 1;
        m.status[i].last_error = Some(why.to_string());
    }
    let attempts = pending
        .iter()
        .map(|&i| m.status[i].attempts)
        .max()
        .unwrap_or(1);
    m.next_attempt = unix_now() + retry_delay(retry, attempts).as_secs().max(1);
    let _ = spool.write_status(&mut m).await;
    Some(m)
}
