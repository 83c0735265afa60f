//! The Maildir agent: local mailboxes written by estafeta itself.

use std::sync::Arc;

use estafeta_maildir::{Maildir, Target, mailbox_path};
use estafeta_policy::{Policy, Route};
use estafeta_proto::reply;
use estafeta_queue::{DeliveryJob, Failure, Outcome, Transport};

/// Delivers recipients routed to Maildir (and refuses those of a local domain that have no
/// mailbox any more).
#[derive(Debug)]
pub struct MaildirAgent {
    pub(crate) policy: Arc<Policy>,
    pub(crate) maildir: Maildir,
    /// The folder template (`[delivery] maildir`).
    pub(crate) template: String,
}

impl Transport for MaildirAgent {
    fn agent(&self, _: &estafeta_proto::Envelope, _: usize) -> &'static str {
        "maildir"
    }

    async fn deliver(&self, job: &DeliveryJob) -> Vec<(usize, Outcome)> {
        let mut outcomes = Vec::with_capacity(job.rcpts.len());
        let mut local: Vec<(usize, Target)> = Vec::new();
        for &i in &job.rcpts {
            let rcpt = &job.envelope.rcpts[i];
            let mb = match self.policy.route(&rcpt.path) {
                Route::Maildir(mb) => mb,
                _ => {
                    let r = reply::user_unknown(&rcpt.path.to_string());
                    outcomes.push((i, Outcome::PermFail(Failure::local(r))));
                    continue;
                }
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
                        fresh: job.fresh,
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
        outcomes
    }
}
