//! The remote agent: other servers over SMTP, by MX, `[relay.routes]` or the smarthost.

use std::sync::Arc;

use estafeta_policy::{Policy, Route, Via};
use estafeta_proto::reply;
use estafeta_queue::{DeliveryJob, Failure, Outcome, Transport};
use estafeta_relay::remote::{Hop, Remote};

/// Delivers recipients routed elsewhere: one session per domain and next hop. Without remote
/// delivery (the embedded development default) they wait in the queue.
#[derive(Debug)]
pub struct RemoteAgent {
    pub(crate) policy: Arc<Policy>,
    pub(crate) remote: Option<Arc<Remote>>,
}

impl Transport for RemoteAgent {
    fn agent(&self, _: &estafeta_proto::Envelope, _: usize) -> &'static str {
        "smtp"
    }

    async fn deliver(&self, job: &DeliveryJob) -> Vec<(usize, Outcome)> {
        let env = &job.envelope;
        let mut outcomes = Vec::with_capacity(job.rcpts.len());
        let mut groups: Vec<((String, Via), Vec<usize>)> = Vec::new();
        for &i in &job.rcpts {
            match self.policy.route(&env.rcpts[i].path) {
                Route::Relay { domain, via } if self.remote.is_some() => {
                    let key = (domain, via);
                    match groups.iter_mut().find(|(k, _)| *k == key) {
                        Some((_, v)) => v.push(i),
                        None => groups.push((key, vec![i])),
                    }
                }
                Route::Relay { .. } => {
                    // Accepted for relay from a trusted client while remote delivery is off
                    // (the embedded default). The message waits in the queue, never lost.
                    let r = reply::remote_delivery_unavailable();
                    outcomes.push((i, Outcome::TempFail(Failure::local(r))));
                }
                _ => {
                    let r = reply::user_unknown(&env.rcpts[i].path.to_string());
                    outcomes.push((i, Outcome::PermFail(Failure::local(r))));
                }
            }
        }
        let Some(remote) = &self.remote else {
            return outcomes;
        };
        let from = env.from.to_string();
        let id = job.id.to_string();
        let content = job.content.as_bytes();
        for ((domain, via), idx) in &groups {
            let rcpts: Vec<(String, estafeta_proto::RcptParams)> = idx
                .iter()
                .map(|&i| (env.rcpts[i].path.to_string(), env.rcpts[i].params.clone()))
                .collect();
            let msg = estafeta_relay::client::OutboundMessage {
                id: &id,
                from: &from,
                params: &env.params,
                rcpts: &rcpts,
                content,
                needs_smtputf8: env.params.smtputf8,
                needs_8bit: env.params.body == Some(estafeta_proto::Body::EightBitMime)
                    || !estafeta_queue::blocks(content, 1 << 20).all(<[u8]>::is_ascii),
            };
            let hop = match via {
                Via::Mx => Hop::Mx,
                Via::Route(h) => Hop::Route(h),
                Via::Smarthost(h) => Hop::Smarthost(h),
            };
            let got = remote.deliver(domain, hop, &msg).await;
            outcomes.extend(idx.iter().copied().zip(got));
        }
        outcomes
    }
}
