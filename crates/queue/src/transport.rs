//! What a delivery agent is given and what it answers: the [`Transport`] trait and the typed
//! per-recipient [`Outcome`] (DESIGN.md decision 4).

use std::future::Future;

use estafeta_proto::{Envelope, Reply};

use crate::id::QueueId;

/// One delivery attempt of one message to some of its recipients.
#[derive(Debug)]
pub struct DeliveryJob {
    /// The message's queue ID, for logs.
    pub id: QueueId,
    /// The envelope (sender, all recipients, parameters).
    pub envelope: Envelope,
    /// The message content as stored (our Received header first).
    pub content: crate::spool::Content,
    /// The indices in `envelope.rcpts` to deliver to in this attempt.
    pub rcpts: Vec<usize>,
    /// The message was recovered at start: a delivery of it may have happened before the
    /// crash without being recorded (local delivery looks for it before repeating it).
    pub recovered: bool,
    /// The first attempt for these recipients (never attempted before, not recovered): no
    /// earlier delivery of it can exist, so local delivery does not look for one.
    pub fresh: bool,
}

/// Why an attempt did not deliver, with what is needed for logs and bounces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The reply: the remote server's, or one from the reply table for a local problem.
    pub reply: Reply,
    /// The remote host that answered, if any.
    pub remote: Option<String>,
    /// The SMTP command the reply answered, if any.
    pub command: Option<String>,
}

impl Failure {
    /// A failure with just a reply (local problems).
    pub fn local(reply: Reply) -> Self {
        Failure {
            reply,
            remote: None,
            command: None,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(remote) = &self.remote {
            write!(f, "{remote} said: ")?;
        }
        write!(f, "{}", self.reply)?;
        if let Some(cmd) = &self.command {
            write!(f, " (in reply to {cmd})")?;
        }
        Ok(())
    }
}

/// The result of an attempt for one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Delivered; the text says where (a Maildir file, a remote server's reply).
    Delivered(String),
    /// Handed to another server that accepted responsibility (RFC 3464 "relayed"); the text
    /// is its reply. `dsn_passed`: that server offered DSN and got the NOTIFY/ORCPT
    /// parameters, so success notifications are now its business (RFC 3461 §5.2.2); without
    /// DSN, a sender who asked for NOTIFY=SUCCESS gets a "relayed" report from us.
    Relayed {
        /// The remote server's reply, for logs.
        detail: String,
        /// The remote server took over DSN duties.
        dsn_passed: bool,
    },
    /// Not delivered now; try again later.
    TempFail(Failure),
    /// Not deliverable; do not try again.
    PermFail(Failure),
}

/// A delivery agent (local Maildir, remote SMTP, or a router over several).
pub trait Transport: Send + Sync + 'static {
    /// Attempts delivery to `job.rcpts` and returns one outcome for each of them (in any order).
    /// A recipient missing from the answer is treated as a temporary failure.
    fn deliver(&self, job: &DeliveryJob) -> impl Future<Output = Vec<(usize, Outcome)>> + Send;

    /// The destinations an attempt for these recipients will connect to (for example the
    /// recipient domains that are not local), each counted against the scheduler's
    /// per-destination limit while the attempt runs. Local deliveries name none (the
    /// default).
    fn destinations(&self, envelope: &Envelope, rcpts: &[usize]) -> Vec<String> {
        let _ = (envelope, rcpts);
        Vec::new()
    }

    /// The name of the delivery agent that handles recipient `rcpt` of `envelope`
    /// (`maildir`, `smtp`, …): the `transport` field of the maillog's delivery events, and a
    /// label of the delivery metrics, so it must come from a small fixed set. The default is
    /// `other`.
    fn agent(&self, envelope: &Envelope, rcpt: usize) -> &'static str {
        let _ = (envelope, rcpt);
        "other"
    }

    /// Whether every recipient of `envelope` can be delivered before the message is
    /// acknowledged, in place of its spool file: a quick local agent (Maildir) whose delivery
    /// is as durable as the spool. [`QueueHandle::submit`](crate::QueueHandle::submit) then
    /// delivers at once and writes a spool file only for the recipients that were not
    /// delivered. The default is false: spooled first, delivered by the scheduler.
    fn immediate(&self, envelope: &Envelope) -> bool {
        let _ = envelope;
        false
    }

    /// Delivers an [`immediate`](Transport::immediate) message before its acknowledgement.
    /// A recipient that no longer qualifies (a reload changed its route since `immediate`
    /// was asked) must come back as a temporary failure, and is queued: only quick local
    /// deliveries may happen while the client waits. The default is [`Transport::deliver`].
    fn deliver_immediate(
        &self,
        job: &DeliveryJob,
    ) -> impl Future<Output = Vec<(usize, Outcome)>> + Send {
        self.deliver(job)
    }

    /// Splits the recipients of an attempt into batches that the scheduler delivers one after
    /// the other, recording the recipients each batch delivered in the spool before the next
    /// batch starts. Quick local deliveries go first, so that a crash during a slow remote one
    /// does not deliver them again. The default is one batch: `job.rcpts`.
    fn batches(&self, job: &DeliveryJob) -> Vec<Vec<usize>> {
        vec![job.rcpts.clone()]
    }
}
