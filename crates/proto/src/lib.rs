//! estafeta-proto: SMTP without I/O.
//!
//! Command and reply syntax, envelope addresses and ESMTP parameters, the one reply table
//! ([`reply`]), the DATA byte-stream rules ([`data`]), trace headers ([`trace`]) and the server
//! [`session::Session`] state machine. No sockets, no tokio, no clock: the driver feeds bytes
//! and answers questions; the session returns actions.

pub mod address;
pub mod command;
pub mod data;
pub mod envelope;
pub mod reply;
pub mod session;
pub mod trace;

pub use address::{Domain, ForwardPath, Mailbox, ReversePath};
pub use command::{Body, Command, MailParams, Notify, Orcpt, RcptParams, Ret};
pub use envelope::{ClientInfo, Envelope, Recipient};
pub use reply::{Reply, Status};
pub use session::{
    Action, AuthMode, Mechanism, SaslAnswer, Session, SessionConfig, Timeout, VrfyMode,
};
