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
            // REQUIRETLS (RFC 8689): our LMTP has no TLS, so only a server on this machine
            // may take such a message; another host over the network is a hop in the clear.
            if env.params.requiretls && !is_local_socket(&server) {
                let r =
                    reply::requiretls_unmet(&format!("LMTP to {server} is not protected by TLS"));
                for (i, _) in rcpts {
                    outcomes.push((i, Outcome::PermFail(Failure::local(r.clone()))));
                }
                continue;
            }
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

/// True for `unix:/PATH` and `inet:` sockets on loopback (`127.0.0.0/8`, `::1`, `localhost`).
fn is_local_socket(server: &str) -> bool {
    let Some(rest) = server.strip_prefix("inet:") else {
        return true;
    };
    let host = match rest.rsplit_once(':') {
        Some((host, _port)) => host,
        None => rest,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    #[test]
    fn local_sockets() {
        for s in [
            "unix:/run/dovecot/lmtp",
            "inet:127.0.0.1:24",
            "inet:[::1]:24",
            "inet:localhost:24",
        ] {
            assert!(super::is_local_socket(s), "{s}");
        }
        for s in [
            "inet:192.0.2.5:24",
            "inet:store.example:24",
            "inet:[2001:db8::5]:24",
        ] {
            assert!(!super::is_local_socket(s), "{s}");
        }
    }
}
