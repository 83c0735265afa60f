//! The LMTP agent: local mailboxes kept by an LMTP server such as Dovecot (its quotas, Sieve
//! and index apply), one client per configured server, shared with the RCPT verification.

use std::collections::HashMap;
use std::sync::Arc;

use estafeta_config::{Config, DomainDelivery};
use estafeta_lmtp::{Address, Lmtp, Timeouts};
use estafeta_policy::{Policy, Route};
use estafeta_proto::reply;
use estafeta_queue::{DeliveryJob, Failure, Outcome, Transport};

/// The LMTP clients of a configuration, by server as written in `delivery = "lmtp:…"`.
pub type LmtpClients = Arc<HashMap<String, Arc<Lmtp>>>;

/// One client (with its pool of sessions) per LMTP server the configuration's domains name,
/// with the delivery timeouts (Postfix's lmtp_* values). An address the client cannot use is
/// an error naming the domain: the start stops, a reload is refused.
pub fn lmtp_clients(cfg: &Config) -> Result<LmtpClients, String> {
    clients(cfg, Timeouts::default())
}

/// The clients the listener verifies RCPTs with: their own pools and cache, and short
/// timeouts, so that a hung LMTP server holds a RCPT for seconds (then `450 4.1.1`), not for
/// the minutes a delivery may take.
pub fn lmtp_verifiers(cfg: &Config) -> Result<LmtpClients, String> {
    clients(cfg, Timeouts::all(std::time::Duration::from_secs(10)))
}

fn clients(cfg: &Config, timeouts: Timeouts) -> Result<LmtpClients, String> {
    let mut clients = HashMap::new();
    for d in &cfg.domains {
        if let DomainDelivery::Lmtp(server) = &d.delivery
            && !clients.contains_key(server)
        {
            let address = server
                .parse::<Address>()
                .map_err(|e| format!("domain {}: delivery lmtp:{server}: {e}", d.name))?;
            let client = Lmtp::new(address, cfg.hostname.clone(), timeouts);
            clients.insert(server.clone(), Arc::new(client));
        }
    }
    Ok(Arc::new(clients))
}

/// Delivers recipients routed to an LMTP server: one transaction per server, one reply per
/// recipient after the data.
#[derive(Debug)]
pub struct LmtpAgent {
    pub(crate) policy: Arc<Policy>,
    pub(crate) clients: LmtpClients,
}

impl Transport for LmtpAgent {
    fn agent(&self, _: &estafeta_proto::Envelope, _: usize) -> &'static str {
        "lmtp"
    }

    async fn deliver(&self, job: &DeliveryJob) -> Vec<(usize, Outcome)> {
        let env = &job.envelope;
        let mut outcomes = Vec::with_capacity(job.rcpts.len());
        let mut groups: Vec<(String, Vec<(usize, String)>)> = Vec::new();
        for &i in &job.rcpts {
            match self.policy.route(&env.rcpts[i].path) {
                Route::Lmtp { mailbox, server } => {
                    let entry = (i, mailbox.address());
                    match groups.iter_mut().find(|(s, _)| *s == server) {
                        Some((_, v)) => v.push(entry),
                        None => groups.push((server, vec![entry])),
                    }
                }
                _ => {
                    let r = reply::user_unknown(&env.rcpts[i].path.to_string());
                    outcomes.push((i, Outcome::PermFail(Failure::local(r))));
                }
            }
        }
        let from = env.from.to_string();
        for (server, rcpts) in groups {
            let Some(client) = self.clients.get(&server) else {
                let r = reply::local_delivery_failed(&format!("no LMTP client for {server}"));
                for (i, _) in rcpts {
                    outcomes.push((i, Outcome::TempFail(Failure::local(r.clone()))));
                }
                continue;
            };
            let list: Vec<(String, estafeta_proto::RcptParams)> = rcpts
                .iter()
                .map(|(i, addr)| (addr.clone(), env.rcpts[*i].params.clone()))
                .collect();
            let got = client
                .deliver(&from, &env.params, &list, job.content.as_bytes())
                .await;
            outcomes.extend(rcpts.iter().map(|(i, _)| *i).zip(got));
        }
        outcomes
    }
}
