//! The milters of one SMTP session (`[[milter]]`): each filter is asked at every step, in
//! the configured order, and a message is acknowledged only once every filter accepted it.
//!
//! The filter connections are opened when the session's first transaction reaches its first
//! RCPT, and the connect and HELO steps are sent then, followed by MAIL: a connection that
//! never tries to send mail (a scanner, a brute-force bot) costs the filters nothing. A reject
//! at connect, HELO or MAIL refuses the transaction's recipients with the filter's reply. A
//! filter that cannot be reached, breaks the protocol or does not answer in time gets its
//! `default_action`: `accept` leaves it out for the rest of the session (Postfix's
//! `milter_default_action = accept`), `tempfail` answers `451 4.7.1`, `reject` `550 5.7.1`.

use std::net::IpAddr;
use std::sync::Arc;

use estafeta_config::{MilterConfig, MilterDefault};
use estafeta_milter::{Address, Milter, Modification, Timeouts, Verdict};
use estafeta_proto::reply::{self, Reply};
use estafeta_proto::{Envelope, ForwardPath, ReversePath};
use estafeta_queue::MessageBody;

/// One configured filter, its address parsed.
#[derive(Debug)]
pub struct MilterSpec {
    /// The configuration entry.
    pub cfg: MilterConfig,
    /// Where it listens.
    pub address: Address,
}

/// The filters of a configuration, each with its address parsed. An address the milter
/// client cannot use is an error (the start stops, a reload is refused): a filter silently
/// left out would let mail through unfiltered.
pub fn specs(milters: &[MilterConfig]) -> Result<Vec<Arc<MilterSpec>>, String> {
    milters
        .iter()
        .enumerate()
        .map(|(i, m)| match m.address.parse::<Address>() {
            Ok(address) => Ok(Arc::new(MilterSpec {
                cfg: m.clone(),
                address,
            })),
            Err(e) => Err(format!("milter[{i}].address: {e}")),
        })
        .collect()
}

/// What the filters decided about a message.
#[derive(Debug)]
pub enum MessageVerdict {
    /// Queue it (modified as the filters asked).
    Accept,
    /// Answer this and keep nothing.
    Refuse(Reply),
    /// Answer 250 and keep nothing.
    Discard,
    /// Queue it held, for this reason.
    Quarantine(String),
}

struct Conn {
    spec: Arc<MilterSpec>,
    /// Connected, and the connect step sent; `None` before the first transaction, or after
    /// a failure (a new connection is tried at the next step, unless `off`).
    milter: Option<Milter>,
    /// Left out for the rest of the session (`default_action = "accept"` after a failure).
    off: bool,
    /// The HELO name this filter was told.
    helo_sent: Option<String>,
    /// MAIL was sent to it for the transaction in progress.
    mail_sent: bool,
}

/// The filters of one SMTP session.
pub struct SessionMilters {
    conns: Vec<Conn>,
}

/// What the session knows that the filters are told.
pub struct SessionInfo<'a> {
    /// The client's verified host name, if any.
    pub client_name: Option<&'a str>,
    /// Its address and port (`None` for local submissions).
    pub peer: Option<(IpAddr, u16)>,
    /// Our host name (macro `j`).
    pub hostname: &'a str,
    /// The HELO/EHLO name.
    pub helo: Option<&'a str>,
    /// The authenticated user.
    pub auth_user: Option<&'a str>,
}

fn fail_reply(default: MilterDefault) -> Option<Reply> {
    match default {
        MilterDefault::Accept => None,
        MilterDefault::Tempfail => Some(reply::milter_tempfail()),
        MilterDefault::Reject => Some(reply::milter_reject()),
    }
}

/// The reply for a filter's reject or tempfail without its own text (Postfix's).
fn verdict_reply(v: &Verdict) -> Option<Reply> {
    match v {
        Verdict::Reject(r) => Some(r.clone().unwrap_or_else(reply::milter_reject)),
        Verdict::TempFail(r) => Some(r.clone().unwrap_or_else(reply::milter_tempfail)),
        Verdict::Shutdown => Some(reply::milter_shutdown()),
        _ => None,
    }
}

fn macros(info: &SessionInfo<'_>) -> Vec<(String, String)> {
    let mut m = vec![
        ("j".to_string(), info.hostname.to_string()),
        ("{daemon_name}".to_string(), "estafeta".to_string()),
        ("v".to_string(), "estafeta".to_string()),
    ];
    if let Some((ip, port)) = info.peer {
        let name = info.client_name.unwrap_or("unknown");
        m.push(("_".into(), format!("{name} [{ip}]")));
        m.push(("{client_addr}".into(), ip.to_string()));
        m.push(("{client_port}".into(), port.to_string()));
        m.push(("{client_name}".into(), name.to_string()));
    }
    if let Some(u) = info.auth_user {
        m.push(("{auth_authen}".into(), u.to_string()));
    }
    m
}

impl SessionMilters {
    /// The filters of `specs` that apply to this listener kind (`None`: local submission).
    pub fn new(
        specs: &[Arc<MilterSpec>],
        kind: Option<estafeta_config::ListenerKind>,
    ) -> Option<SessionMilters> {
        let conns: Vec<Conn> = specs
            .iter()
            .filter(|s| match (&s.cfg.listeners, kind) {
                (None, _) => true,
                (Some(list), Some(k)) => list.contains(&k),
                (Some(_), None) => false,
            })
            .map(|s| Conn {
                spec: s.clone(),
                milter: None,
                off: false,
                helo_sent: None,
                mail_sent: false,
            })
            .collect();
        (!conns.is_empty()).then_some(SessionMilters { conns })
    }

    /// A new transaction starts: MAIL is sent again before its first RCPT (a filter aborts
    /// an unfinished transaction itself when it gets a new MAIL).
    pub fn new_transaction(&mut self) {
        for c in &mut self.conns {
            c.mail_sent = false;
        }
    }

    /// The RCPT step, with whatever this filter has not been told yet first: connection,
    /// HELO, MAIL.
    pub async fn rcpt(
        &mut self,
        info: &SessionInfo<'_>,
        from: &ReversePath,
        rcpt: &ForwardPath,
    ) -> Result<(), Reply> {
        let m = macros(info);
        let mut mm = m.clone();
        mm.push(("{mail_addr}".into(), from.to_string()));
        let mut rm = m.clone();
        rm.push(("{rcpt_addr}".into(), rcpt.to_string()));
        for conn in self.conns.iter_mut().filter(|c| !c.off) {
            match step_rcpt(conn, info, &m, &mm, &rm, from, rcpt).await {
                Ok(v) => {
                    if let Some(r) = verdict_reply(&v) {
                        return Err(r);
                    }
                }
                Err(e) => {
                    if let Some(r) = failed(conn, &e) {
                        return Err(r);
                    }
                }
            }
        }
        Ok(())
    }

    /// The message, to each filter in turn (each sees what the ones before it changed); the
    /// envelope and content changed as they ask.
    pub async fn message(
        &mut self,
        info: &SessionInfo<'_>,
        envelope: &mut Envelope,
        body: &mut MessageBody,
    ) -> MessageVerdict {
        let m = macros(info);
        let mut quarantine: Option<String> = None;
        for conn in self.conns.iter_mut().filter(|c| !c.off) {
            conn.mail_sent = false;
            let Some(milter) = conn.milter.as_mut() else {
                // It failed earlier in this transaction (with tempfail or reject: an
                // `accept` one is off): the message was never shown to it.
                match fail_reply(conn.spec.cfg.default_action) {
                    Some(r) => return MessageVerdict::Refuse(r),
                    None => continue,
                }
            };
            let sent = match &*body {
                MessageBody::Memory(v) => milter.message(v, &m).await,
                MessageBody::Spilled(s) => match s.map_received() {
                    Ok(map) => milter.message_parts(s.head(), s.body_of(&map), &m).await,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the message for the milters");
                        return MessageVerdict::Refuse(reply::queue_error());
                    }
                },
            };
            let (verdict, mods) = match sent {
                Ok(r) => r,
                Err(e) => match failed(conn, &e) {
                    Some(r) => return MessageVerdict::Refuse(r),
                    None => continue,
                },
            };
            match &verdict {
                Verdict::Discard => return MessageVerdict::Discard,
                v => {
                    if let Some(r) = verdict_reply(v) {
                        return MessageVerdict::Refuse(r);
                    }
                }
            }
            if !mods.is_empty() {
                tracing::debug!(milter = %conn.spec.cfg.address, changes = mods.len(), "milter modifications");
                match body {
                    MessageBody::Memory(v) => *v = estafeta_milter::apply(v, &mods),
                    MessageBody::Spilled(s) => {
                        // The header section is edited apart; a new body replaces the file.
                        let edited = estafeta_milter::apply(s.head(), &mods);
                        if mods
                            .iter()
                            .any(|m| matches!(m, Modification::ReplaceBody(_)))
                        {
                            *body = MessageBody::Memory(edited);
                        } else {
                            *s.head_mut() = edited;
                        }
                    }
                }
            }
            for change in mods {
                match change {
                    Modification::AddRcpt { rcpt, .. } => {
                        match estafeta_proto::address::parse_forward_path(&format!("<{rcpt}>")) {
                            Ok((path, _)) => envelope.rcpts.push(estafeta_proto::Recipient {
                                path,
                                params: Default::default(),
                            }),
                            Err(_) => {
                                tracing::warn!(milter = %conn.spec.cfg.address, rcpt, "milter added an invalid recipient: ignored")
                            }
                        }
                    }
                    Modification::DelRcpt(rcpt) => {
                        let gone = rcpt.to_lowercase();
                        envelope
                            .rcpts
                            .retain(|r| r.path.to_string().to_lowercase() != gone);
                    }
                    Modification::ChangeFrom { from, .. } => {
                        match estafeta_proto::address::parse_reverse_path(&format!("<{from}>")) {
                            Ok((path, _)) => envelope.from = path,
                            Err(_) => {
                                tracing::warn!(milter = %conn.spec.cfg.address, from, "milter set an invalid sender: ignored")
                            }
                        }
                    }
                    Modification::Quarantine(reason) => quarantine = Some(reason),
                    _ => {}
                }
            }
        }
        if envelope.rcpts.is_empty() {
            // Every recipient removed: nothing to deliver, as Postfix discards it.
            return MessageVerdict::Discard;
        }
        match quarantine {
            Some(reason) => MessageVerdict::Quarantine(reason),
            None => MessageVerdict::Accept,
        }
    }

    /// The session ends: QUIT to every filter.
    pub async fn quit(self) {
        for conn in self.conns {
            if let Some(milter) = conn.milter {
                milter.quit().await;
            }
        }
    }
}

/// A filter failed: its default action, or `None` when it is now left out.
fn failed(conn: &mut Conn, error: &estafeta_milter::Error) -> Option<Reply> {
    tracing::warn!(milter = %conn.spec.cfg.address, error = %error, default_action = ?conn.spec.cfg.default_action, "milter failed");
    conn.milter = None;
    conn.helo_sent = None;
    conn.mail_sent = false;
    let r = fail_reply(conn.spec.cfg.default_action);
    if r.is_none() {
        conn.off = true;
    }
    r
}

/// One filter's RCPT step, preceded by what it has not been told yet.
async fn step_rcpt(
    conn: &mut Conn,
    info: &SessionInfo<'_>,
    m: &[(String, String)],
    mm: &[(String, String)],
    rm: &[(String, String)],
    from: &ReversePath,
    rcpt: &ForwardPath,
) -> Result<Verdict, estafeta_milter::Error> {
    if conn.milter.is_none() {
        let t = conn.spec.cfg.timeout;
        let timeouts = Timeouts {
            connect: t,
            command: t,
            eom: t,
        };
        let mut milter = Milter::connect(&conn.spec.address, timeouts).await?;
        let (ip, port) = info.peer.unwrap_or((IpAddr::from([127, 0, 0, 1]), 0));
        let host = info
            .client_name
            .map(str::to_string)
            .unwrap_or_else(|| format!("[{ip}]"));
        let v = milter.connect_step(&host, ip, port, m).await?;
        conn.milter = Some(milter);
        if v != Verdict::Continue {
            return Ok(v);
        }
    }
    let milter = conn.milter.as_mut().expect("connected above");
    let helo = info.helo.unwrap_or("");
    if conn.helo_sent.as_deref() != Some(helo) {
        conn.helo_sent = Some(helo.to_string());
        let v = milter.helo(helo, m).await?;
        if v != Verdict::Continue {
            return Ok(v);
        }
    }
    if !conn.mail_sent {
        conn.mail_sent = true;
        let sender = match from {
            ReversePath::Null => String::new(),
            ReversePath::Mailbox(mb) => mb.to_string(),
        };
        let v = milter.mail(&sender, &[], mm).await?;
        if v != Verdict::Continue {
            return Ok(v);
        }
    }
    let to = rcpt.mailbox.to_string();
    milter.rcpt(&to, &[], rm).await
}
