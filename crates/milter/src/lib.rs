//! The milter client: the Sendmail/Postfix milter protocol (version 6) spoken to filters such
//! as rspamd, OpenDKIM or ClamAV before a message is acknowledged.
//!
//! - [`codec`]: the wire format, without I/O (commands out, responses in);
//! - [`client`]: the connection to one filter, negotiation and one call per SMTP step, each
//!   answering the filter's [`Verdict`];
//! - [`edit`]: the filter's header and body [`Modification`]s applied to the raw message.
//!
//! See `docs/milter.md` for what is supported and why it is written by hand.

pub mod client;
pub mod codec;
pub mod edit;

pub use client::{Address, Error, Milter, Timeouts};
pub use edit::apply;

use estafeta_proto::Reply;

/// A filter's answer to one SMTP step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Go on (also the answer for steps the filter did not want or does not answer).
    Continue,
    /// Accept: ask this filter nothing more about this message (after connect or HELO: about
    /// this SMTP connection). Modifications already received still apply.
    Accept,
    /// Refuse (the recipient after RCPT, the message after MAIL or the message content, the
    /// whole connection after connect or HELO). `Some` when the filter gave its own reply
    /// (`SMFIR_REPLYCODE` with a 5xx code), to be sent to the SMTP client as is; `None`:
    /// send the usual `550 5.7.1`.
    Reject(Option<Reply>),
    /// Refuse for now, as `Reject` but temporary (`451 4.7.1` when `None`).
    TempFail(Option<Reply>),
    /// Accept the message and throw it away (after MAIL, RCPT or the content).
    Discard,
    /// The filter asks to end the SMTP connection (`SMFIR_SHUTDOWN` or `SMFIR_CONNFAIL`):
    /// answer `421` and close. The filter connection is no longer usable.
    Shutdown,
}

/// A change a filter asks for at the end of the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Modification {
    /// Append a header field at the end of the header section.
    AddHeader {
        /// Field name.
        name: String,
        /// Field value, without the space after the colon.
        value: String,
    },
    /// Insert a header field before the `index`-th one (0: at the top).
    InsertHeader {
        /// Position among the header fields.
        index: u32,
        /// Field name.
        name: String,
        /// Field value, without the space after the colon.
        value: String,
    },
    /// Replace the `index`-th (from 1) field called `name`; an empty value deletes it.
    ChangeHeader {
        /// Field name (compared without case).
        name: String,
        /// Occurrence, from 1.
        index: u32,
        /// New value; empty: delete the field.
        value: String,
    },
    /// Replace the body with these bytes (the filter's chunks put together).
    ReplaceBody(Vec<u8>),
    /// Add a recipient (the address as the filter wrote it, angle brackets removed), with
    /// ESMTP parameters (`NOTIFY=NEVER`…), if any.
    AddRcpt {
        /// The recipient address.
        rcpt: String,
        /// ESMTP parameters, one per element.
        args: Vec<String>,
    },
    /// Remove a recipient (angle brackets removed).
    DelRcpt(String),
    /// Change the envelope sender (angle brackets removed; empty for the null sender), with
    /// ESMTP parameters, if any.
    ChangeFrom {
        /// The new sender.
        from: String,
        /// ESMTP parameters, one per element.
        args: Vec<String>,
    },
    /// Hold the message in quarantine, for this reason.
    Quarantine(String),
}
