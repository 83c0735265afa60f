//! The envelope of one transaction: who connected, who sends, to whom, with which parameters.

use std::net::IpAddr;

use crate::address::{ForwardPath, ReversePath};
use crate::command::{MailParams, RcptParams};

/// What is known about the client when a message is accepted; written into the Received
/// header and kept in the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// The client's IP address (IPv4-mapped IPv6 already canonicalised to IPv4).
    pub ip: IpAddr,
    /// The client's TCP port.
    pub port: u16,
    /// The name the client gave in HELO/EHLO.
    pub helo: String,
    /// The `with` protocol of the Received header: SMTP, ESMTP, ESMTPS, ESMTPA, ESMTPSA and
    /// their UTF8 forms (RFC 3848, RFC 6531 §3.7.3).
    pub protocol: String,
    /// TLS version and cipher, when the session is encrypted.
    pub tls: Option<String>,
    /// The authenticated user, recorded only when the configuration asks for it
    /// (`[auth] authenticated_header`): it is written into the Received header.
    pub auth: Option<String>,
    /// A local submission (the submit socket, `sendmail`): the uid the kernel reported for
    /// the peer. The Received header then names the user instead of a network client.
    pub local_uid: Option<u32>,
    /// The client's forward-confirmed reverse DNS name (FCrDNS), named in the Received header;
    /// `None` when it has none (or it was not looked up).
    pub name: Option<String>,
}

/// One accepted recipient with its RCPT parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    /// The forward path as given.
    pub path: ForwardPath,
    /// NOTIFY and ORCPT.
    pub params: RcptParams,
}

/// The envelope of one message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// The client.
    pub client: ClientInfo,
    /// The reverse path of MAIL FROM.
    pub from: ReversePath,
    /// The MAIL parameters.
    pub params: MailParams,
    /// The accepted recipients, in RCPT order.
    pub rcpts: Vec<Recipient>,
}
