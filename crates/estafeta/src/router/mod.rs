//! The transport the scheduler uses: a thin composite over the delivery agents. Each
//! recipient's route is decided by one function, [`Policy::route`] (Maildir, LMTP, a pipe, or
//! another server by MX, `[relay.routes]` or the smarthost); each agent implements the
//! queue's [`Transport`] for the recipients routed to it.

mod lmtp;
mod maildir;
mod pipe;
mod remote;

use std::sync::Arc;

use estafeta_config::Config;
use estafeta_maildir::Maildir;
use estafeta_policy::{Policy, Route};
use estafeta_queue::{DeliveryJob, Outcome, Transport};

pub use lmtp::{LmtpAgent, LmtpClients, lmtp_clients, lmtp_verifiers};
pub use maildir::MaildirAgent;
pub use pipe::{PipeAgent, pipe_users};
pub use remote::RemoteAgent;

/// Routes recipients to delivery agents.
#[derive(Debug)]
pub struct Router {
    policy: Arc<Policy>,
    maildir: MaildirAgent,
    remote: RemoteAgent,
    pipe: PipeAgent,
    lmtp: LmtpAgent,
}

/// The delivery agents, in the order a job's batches go to them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Agent {
    Maildir,
    Lmtp,
    Pipe,
    Remote,
}

impl Router {
    /// A router delivering local mail with `maildir` into folders named by the configuration's
    /// template, to the configuration's pipes, and (with [`Router::with_remote`]) elsewhere.
    /// Fails when a pipe's `user` cannot be used.
    pub fn new(
        policy: Arc<Policy>,
        maildir: Maildir,
        cfg: &Config,
        lmtp: LmtpClients,
    ) -> Result<Self, String> {
        Ok(Router {
            maildir: MaildirAgent {
                policy: policy.clone(),
                maildir,
                template: cfg.delivery.maildir.clone(),
            },
            remote: RemoteAgent {
                policy: policy.clone(),
                remote: None,
            },
            pipe: PipeAgent {
                policy: policy.clone(),
                pipes: cfg.pipes.clone(),
                separator: cfg.delivery.subaddress_separator.clone(),
                users: pipe_users(&cfg.pipes)?,
            },
            lmtp: LmtpAgent {
                policy: policy.clone(),
                clients: lmtp,
            },
            policy,
        })
    }

    /// The same router, delivering recipients elsewhere with `remote`.
    pub fn with_remote(mut self, remote: Arc<estafeta_relay::remote::Remote>) -> Self {
        self.remote.remote = Some(remote);
        self
    }

    /// The policy whose `route` this router follows.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    fn route(&self, envelope: &estafeta_proto::Envelope, rcpt: usize) -> Route {
        self.policy.route(&envelope.rcpts[rcpt].path)
    }

    fn agent_of(route: &Route) -> Agent {
        match route {
            Route::Maildir(_) | Route::Unknown => Agent::Maildir,
            Route::Lmtp { .. } => Agent::Lmtp,
            Route::Pipe { .. } => Agent::Pipe,
            Route::Relay { .. } => Agent::Remote,
        }
    }
}

impl Transport for Router {
    /// The destinations of these recipients, counted against the queue's per-destination
    /// limit: each relayed domain (or its route or smarthost), each LMTP server, each pipe.
    fn destinations(&self, envelope: &estafeta_proto::Envelope, rcpts: &[usize]) -> Vec<String> {
        let mut dests: Vec<String> = Vec::new();
        for &i in rcpts {
            if let Some(d) = self.route(envelope, i).destination()
                && !dests.contains(&d)
            {
                dests.push(d);
            }
        }
        dests
    }

    fn agent(&self, envelope: &estafeta_proto::Envelope, rcpt: usize) -> &'static str {
        self.route(envelope, rcpt).agent()
    }

    /// Only the recipients routed to a Maildir (with this router: the one `immediate`
    /// asked may have been replaced by a reload since); any other is a temporary failure,
    /// queued by the caller.
    async fn deliver_immediate(&self, job: &DeliveryJob) -> Vec<(usize, Outcome)> {
        let (local, other): (Vec<usize>, Vec<usize>) = job
            .rcpts
            .iter()
            .partition(|&&i| matches!(self.route(&job.envelope, i), Route::Maildir(_)));
        let mut outcomes = if other.is_empty() {
            self.maildir.deliver(job).await
        } else if local.is_empty() {
            Vec::new()
        } else {
            let part = DeliveryJob {
                id: job.id,
                envelope: job.envelope.clone(),
                content: job.content.clone(),
                rcpts: local,
                recovered: job.recovered,
                fresh: job.fresh,
            };
            self.maildir.deliver(&part).await
        };
        for i in other {
            let reply = estafeta_proto::reply::local_error();
            outcomes.push((i, Outcome::TempFail(estafeta_queue::Failure::local(reply))));
        }
        outcomes
    }

    /// Every recipient goes to a Maildir estafeta writes itself: delivered before the `250`,
    /// without a spool file (the Maildir delivery is as durable as the spool's).
    fn immediate(&self, envelope: &estafeta_proto::Envelope) -> bool {
        !envelope.rcpts.is_empty()
            && (0..envelope.rcpts.len())
                .all(|i| matches!(self.route(envelope, i), Route::Maildir(_)))
    }

    /// One batch per agent, quick local deliveries (Maildir) first, then LMTP, pipes and
    /// other servers: the scheduler records what each batch delivered before the next one
    /// starts, so a crash or a stop during a slow remote delivery repeats no LMTP or pipe
    /// delivery that was already done (those, unlike Maildir, cannot look for the first copy).
    fn batches(&self, job: &DeliveryJob) -> Vec<Vec<usize>> {
        let mut parts: Vec<(Agent, Vec<usize>)> = Vec::new();
        for &i in &job.rcpts {
            let agent = Self::agent_of(&self.route(&job.envelope, i));
            match parts.iter_mut().find(|(a, _)| *a == agent) {
                Some((_, v)) => v.push(i),
                None => parts.push((agent, vec![i])),
            }
        }
        if parts.len() <= 1 {
            return vec![job.rcpts.clone()];
        }
        parts.sort_by_key(|(a, _)| *a);
        parts.into_iter().map(|(_, v)| v).collect()
    }

    async fn deliver(&self, job: &DeliveryJob) -> Vec<(usize, Outcome)> {
        let mut parts: Vec<(Agent, Vec<usize>)> = Vec::new();
        for &i in &job.rcpts {
            let agent = Self::agent_of(&self.route(&job.envelope, i));
            match parts.iter_mut().find(|(a, _)| *a == agent) {
                Some((_, v)) => v.push(i),
                None => parts.push((agent, vec![i])),
            }
        }
        if let [(agent, _)] = parts.as_slice() {
            // One agent for every recipient (the usual case): the job as it is.
            return match agent {
                Agent::Maildir => self.maildir.deliver(job).await,
                Agent::Lmtp => self.lmtp.deliver(job).await,
                Agent::Pipe => self.pipe.deliver(job).await,
                Agent::Remote => self.remote.deliver(job).await,
            };
        }
        let mut outcomes = Vec::with_capacity(job.rcpts.len());
        for (agent, rcpts) in parts {
            let part = DeliveryJob {
                id: job.id,
                envelope: job.envelope.clone(),
                content: job.content.clone(),
                rcpts,
                recovered: job.recovered,
                fresh: job.fresh,
            };
            outcomes.extend(match agent {
                Agent::Maildir => self.maildir.deliver(&part).await,
                Agent::Lmtp => self.lmtp.deliver(&part).await,
                Agent::Pipe => self.pipe.deliver(&part).await,
                Agent::Remote => self.remote.deliver(&part).await,
            });
        }
        outcomes
    }
}

/// The router in service: a reload replaces it. Each call (`deliver`, `batches`,
/// `destinations`, `agent`) takes the router in service at that moment and keeps it to the
/// end of that call: a batch being delivered finishes with the router it started with, the
/// next batch of the same attempt may use a newer one.
#[derive(Debug)]
pub struct LiveRouter(std::sync::RwLock<Arc<Router>>);

impl LiveRouter {
    /// A live router starting with `router`.
    pub fn new(router: Router) -> Self {
        LiveRouter(std::sync::RwLock::new(Arc::new(router)))
    }

    /// The router in service.
    pub fn current(&self) -> Arc<Router> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `router` in service for the attempts that start from now on.
    pub fn replace(&self, router: Router) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(router);
    }
}

/// Every method delegates to the router in service (a default method left out here would
/// answer for the wrapper, not for the router: `agent` once did).
impl Transport for LiveRouter {
    fn agent(&self, envelope: &estafeta_proto::Envelope, rcpt: usize) -> &'static str {
        self.current().agent(envelope, rcpt)
    }

    fn destinations(&self, envelope: &estafeta_proto::Envelope, rcpts: &[usize]) -> Vec<String> {
        self.current().destinations(envelope, rcpts)
    }

    fn immediate(&self, envelope: &estafeta_proto::Envelope) -> bool {
        self.current().immediate(envelope)
    }

    async fn deliver_immediate(&self, job: &DeliveryJob) -> Vec<(usize, Outcome)> {
        let router = self.current();
        router.deliver_immediate(job).await
    }

    fn batches(&self, job: &DeliveryJob) -> Vec<Vec<usize>> {
        self.current().batches(job)
    }

    async fn deliver(&self, job: &DeliveryJob) -> Vec<(usize, Outcome)> {
        let router = self.current();
        router.deliver(job).await
    }
}
