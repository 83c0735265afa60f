//! The transport the scheduler uses: it sends each recipient to its delivery agent: a local
//! mailbox (Maildir), or remote delivery, one session per recipient domain.

use std::sync::Arc;

use estafeta_maildir::{Maildir, Target, mailbox_path};
use estafeta_policy::Policy;
use estafeta_proto::reply;
use estafeta_queue::{DeliveryJob, Failure, Outcome, Transport};

/// Routes recipients to delivery agents.
#[derive(Debug)]
pub struct Router {
    policy: Arc<Policy>,
    maildir: Maildir,
    template: String,
    remote: Option<Arc<estafeta_relay::remote::Remote>>,
}

impl Router {
    /// A router delivering local mail with `maildir` into folders named by `template`.
    pub fn new(policy: Arc<Policy>, maildir: Maildir, template: String) -> Self {
        Router {
            policy,
            maildir,
            template,
            remote: None,
        }
    }

    /// The same router, delivering recipients elsewhere with `remote`.
    pub fn with_remote(mut self, remote: Arc<estafeta_relay::remote::Remote>) -> Self {
        self.remote = Some(remote);
        self
    }

    /// Delivers the remote recipients `idx` (all of `domain`).
    async fn deliver_remote(
        &self,
        remote: &estafeta_relay::remote::Remote,
        job: &DeliveryJob,
        domain: &str,
        idx: &[usize],
    ) -> Vec<(usize, Outcome)> {
        let env = &job.envelope;
        let rcpts: Vec<(String, estafeta_proto::RcptParams)> = idx
            .iter()
            .map(|&i| (env.rcpts[i].path.to_string(), env.rcpts[i].params.clone()))
            .collect();
        let from = env.from.to_string();
        let content = job.content.as_bytes();
        let msg = estafeta_relay::client::OutboundMessage {
            from: &from,
            params: &env.params,
            rcpts: &rcpts,
            content,
            needs_smtputf8: env.params.smtputf8,
            needs_8bit: env.params.body == Some(estafeta_proto::Body::EightBitMime)
                || !content.is_ascii(),
        };
        let outcomes = remote.deliver(domain, &msg).await;
        idx.iter().copied().zip(outcomes).collect()
    }

    /// True when `rcpt` goes to remote delivery.
    fn is_remote(&self, rcpt: &estafeta_proto::Recipient) -> bool {
        self.remote.is_some()
            && self.policy.mailbox_of(&rcpt.path).is_none()
            && !self.policy.is_local_domain(&rcpt.path.mailbox.domain.key())
    }
}

impl Transport for Router {
    /// The remote destinations of these recipients: their domains (each its own MX hosts), or
    /// the smarthost when everything goes through it. Local mailboxes are not limited.
    fn destinations(&self, envelope: &estafeta_proto::Envelope, rcpts: &[usize]) -> Vec<String> {
        let Some(remote) = &self.remote else {
            return Vec::new();
        };
        let mut dests: Vec<String> = Vec::new();
        for &i in rcpts {
            let path = &envelope.rcpts[i].path;
            let domain = estafeta_policy::domain_key(&path.mailbox.domain.key());
            if self.policy.is_local_domain(&domain) {
                continue;
            }
            let dest = match &remote.smarthost {
                Some(h) if !remote.routes.contains_key(&domain) => {
                    format!("smarthost {}:{}", h.host, h.port)
                }
                _ => domain,
            };
            if !dests.contains(&dest) {
                dests.push(dest);
            }
        }
        dests
    }

    /// `maildir` for a local recipient (a mailbox, or an unknown user of a local domain),
    /// `smtp` for the others (remote delivery, or waiting for it while it is off).
    fn agent(&self, envelope: &estafeta_proto::Envelope, rcpt: usize) -> &'static str {
        let path = &envelope.rcpts[rcpt].path;
        if self.policy.mailbox_of(path).is_some()
            || self.policy.is_local_domain(&path.mailbox.domain.key())
        {
            "maildir"
        } else {
            "smtp"
        }
    }

    /// Local recipients first, then the remote ones: the scheduler records the local
    /// deliveries before a remote delivery, which may take minutes, starts.
    fn batches(&self, job: &DeliveryJob) -> Vec<Vec<usize>> {
        let (remote, local): (Vec<usize>, Vec<usize>) = job
            .rcpts
            .iter()
            .partition(|&&i| self.is_remote(&job.envelope.rcpts[i]));
        if local.is_empty() || remote.is_empty() {
            return vec![job.rcpts.clone()];
        }
        vec![local, remote]
    }

    async fn deliver(&self, job: &DeliveryJob) -> Vec<(usize, Outcome)> {
        let mut outcomes = Vec::with_capacity(job.rcpts.len());
        let mut local: Vec<(usize, Target)> = Vec::new();
        let mut remote_groups: Vec<(String, Vec<usize>)> = Vec::new();
        for &i in &job.rcpts {
            let rcpt = &job.envelope.rcpts[i];
            // Recipients were expanded (aliases, catch-all) before queueing: a local one is a
            // mailbox.
            let Some(mb) = self.policy.mailbox_of(&rcpt.path) else {
                if self.policy.is_local_domain(&rcpt.path.mailbox.domain.key()) {
                    let r = reply::user_unknown(&rcpt.path.to_string());
                    outcomes.push((i, Outcome::PermFail(Failure::local(r))));
                } else if self.remote.is_some() {
                    let domain = estafeta_policy::domain_key(&rcpt.path.mailbox.domain.key());
                    match remote_groups.iter_mut().find(|(d, _)| *d == domain) {
                        Some((_, v)) => v.push(i),
                        None => remote_groups.push((domain, vec![i])),
                    }
                } else {
                    // Accepted for relay from a trusted client while remote delivery is off
                    // (the embedded default). The message waits in the queue, never lost.
                    let r = reply::remote_delivery_unavailable();
                    outcomes.push((i, Outcome::TempFail(Failure::local(r))));
                }
                continue;
            };
            match mailbox_path(&self.template, &mb.domain, &mb.user) {
                Ok(maildir) => local.push((
                    i,
                    Target {
                        maildir,
                        delivered_to: mb.address(),
                        // Named after the message and the recipient: a delivery repeated
                        // after a crash finds the first one instead of making a second.
                        key: Some(format!("E{}R{i}", job.id)),
                        look_in_cur: job.recovered,
                    },
                )),
                Err(e) => {
                    let r = reply::user_unknown(&format!("{} ({e})", rcpt.path));
                    outcomes.push((i, Outcome::PermFail(Failure::local(r))));
                }
            }
        }
        if !local.is_empty() {
            let targets: Vec<Target> = local.iter().map(|(_, t)| t.clone()).collect();
            let return_path = job.envelope.from.to_string();
            let results = self
                .maildir
                .deliver(&targets, &return_path, job.content.as_bytes())
                .await;
            for ((i, _), r) in local.into_iter().zip(results) {
                outcomes.push((
                    i,
                    match r {
                        Ok(path) => Outcome::Delivered(format!("maildir {}", path.display())),
                        Err(e) => Outcome::TempFail(Failure::local(reply::local_delivery_failed(
                            &e.to_string(),
                        ))),
                    },
                ));
            }
        }
        if let Some(remote) = &self.remote {
            for (domain, idx) in &remote_groups {
                outcomes.extend(self.deliver_remote(remote, job, domain, idx).await);
            }
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

    fn batches(&self, job: &DeliveryJob) -> Vec<Vec<usize>> {
        self.current().batches(job)
    }

    async fn deliver(&self, job: &DeliveryJob) -> Vec<(usize, Outcome)> {
        let router = self.current();
        router.deliver(job).await
    }
}
