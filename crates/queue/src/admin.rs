//! Queue administration: what the operator asks of the queue (flush, hold, release, delete,
//! bounce) and what came of it.
//!
//! The running scheduler carries these out in its event loop ([`crate::QueueHandle::admin`]);
//! [`apply_offline`] does the same on the spool files while no server runs, in the way the
//! next start will pick up.

use std::io;

use crate::id::QueueId;
use crate::scheduler::{SchedulerConfig, bounce_now};
use crate::spool::{QueuedMessage, Spool, unix_now};

/// Which messages a flush is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every message in the queue.
    All,
    /// These messages.
    Ids(Vec<QueueId>),
    /// The messages with a pending recipient in this domain (ETRN, `queue flush --domain`).
    Domain(String),
}

/// One administrative action on the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminAction {
    /// Attempt these messages now, whatever their retry schedule (held messages excepted).
    Flush(Selection),
    /// Never attempt these messages until released (like Postfix's hold queue).
    Hold(Vec<QueueId>),
    /// Undo a hold: the message is attempted at once.
    Release(Vec<QueueId>),
    /// Remove the messages without any notification (like `postsuper -d`).
    Delete(Vec<QueueId>),
    /// Fail every pending recipient and send the usual failure notification to the sender.
    Bounce(Vec<QueueId>),
}

/// The action as one line: `flush`, `flush ID…`, `flush-domain DOMAIN`, `hold ID…`,
/// `release ID…`, `delete ID…`, `bounce ID…` (for logs, and the control socket's requests).
impl std::fmt::Display for AdminAction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (verb, ids) = match self {
            AdminAction::Flush(Selection::All) => return f.write_str("flush"),
            AdminAction::Flush(Selection::Domain(d)) => return write!(f, "flush-domain {d}"),
            AdminAction::Flush(Selection::Ids(v)) => ("flush", v),
            AdminAction::Hold(v) => ("hold", v),
            AdminAction::Release(v) => ("release", v),
            AdminAction::Delete(v) => ("delete", v),
            AdminAction::Bounce(v) => ("bounce", v),
        };
        f.write_str(verb)?;
        for id in ids {
            write!(f, " {id}")?;
        }
        Ok(())
    }
}

/// What an [`AdminAction`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AdminReport {
    /// The messages acted on. For a message being delivered right now, hold, delete and
    /// bounce take effect as soon as that attempt returns.
    pub done: Vec<QueueId>,
    /// Messages found but left alone: held messages are not flushed.
    pub skipped: Vec<QueueId>,
    /// Messages that are not in the queue (delivered meanwhile, or never there).
    pub unknown: Vec<QueueId>,
}

/// True when `m` has a pending recipient in `domain` (compared case-insensitively).
pub fn has_pending_in(m: &QueuedMessage, domain: &str) -> bool {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    m.pending()
        .into_iter()
        .any(|i| m.envelope.rcpts[i].path.mailbox.domain.key() == domain)
}

/// Carries out `action` on the spool files while no server runs:
///
/// - flush: the next attempt of each selected message is set to "now", so that the next start
///   tries it at once;
/// - hold and release: the hold mark in the message's state file (release also makes the next
///   attempt "now");
/// - delete: the message's files are removed;
/// - bounce: the failure notification is written into the spool (delivered at the next start)
///   and the message is removed.
pub async fn apply_offline(
    spool: &Spool,
    cfg: &SchedulerConfig,
    action: AdminAction,
) -> io::Result<AdminReport> {
    // Only a spool nobody runs is ours to edit (a server still stopping holds the lock).
    let _lock = spool.lock()?;
    let mut report = AdminReport::default();
    match action {
        AdminAction::Flush(sel) => {
            let messages = match &sel {
                Selection::All => spool.scan()?.0,
                Selection::Domain(d) => spool
                    .scan()?
                    .0
                    .into_iter()
                    .filter(|m| has_pending_in(m, d))
                    .collect(),
                Selection::Ids(ids) => {
                    let mut found = Vec::new();
                    for &id in ids {
                        match load(spool, id)? {
                            Some(m) => found.push(m),
                            None => report.unknown.push(id),
                        }
                    }
                    found
                }
            };
            let now = unix_now();
            for mut m in messages {
                if m.held {
                    report.skipped.push(m.id);
                    continue;
                }
                if m.next_attempt > now {
                    m.next_attempt = 0;
                    spool.write_status(&mut m).await?;
                }
                report.done.push(m.id);
            }
        }
        AdminAction::Hold(ids) => {
            for id in ids {
                let Some(mut m) = load(spool, id)? else {
                    report.unknown.push(id);
                    continue;
                };
                if !m.held {
                    m.held = true;
                    spool.write_status(&mut m).await?;
                }
                report.done.push(id);
            }
        }
        AdminAction::Release(ids) => {
            for id in ids {
                let Some(mut m) = load(spool, id)? else {
                    report.unknown.push(id);
                    continue;
                };
                if m.held {
                    m.held = false;
                    m.next_attempt = 0;
                    spool.write_status(&mut m).await?;
                }
                report.done.push(id);
            }
        }
        AdminAction::Delete(ids) => {
            for id in ids {
                let Some(m) = load(spool, id)? else {
                    report.unknown.push(id);
                    continue;
                };
                spool.remove(&m)?;
                tracing::info!(target: "estafeta::maillog", id = %id, "deleted by the administrator");
                report.done.push(id);
            }
        }
        AdminAction::Bounce(ids) => {
            for id in ids {
                let Some(m) = load(spool, id)? else {
                    report.unknown.push(id);
                    continue;
                };
                bounce_now(spool, cfg, None, m).await;
                report.done.push(id);
            }
        }
    }
    Ok(report)
}

/// Loads a message; `None` when it is not in the spool.
fn load(spool: &Spool, id: QueueId) -> io::Result<Option<QueuedMessage>> {
    match spool.load(id) {
        Ok(m) => Ok(Some(m)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}
