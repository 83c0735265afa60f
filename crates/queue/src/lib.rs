//! estafeta-queue: the durable spool, the delivery scheduler and the [`Transport`] trait.
//!
//! A message is acknowledged only once [`Spool::put`] returned, that is once its file and its
//! directory entry are on stable storage (group-committed by the [`Syncer`]). The
//! [`scheduler`] hands due messages to a transport and records each recipient's outcome.

pub mod admin;
pub mod body;
pub mod clock;
pub mod dsn;
pub mod id;
pub mod scheduler;
pub mod spool;
pub mod sync;
pub mod transport;

pub use admin::{AdminAction, AdminReport, Selection, apply_offline};
pub use body::{MessageBody, SPILL_AT, SpillWriter, Spilled, blocks};
pub use clock::Clock;
pub use dsn::{DsnAction, DsnInput, DsnRecipient, build_dsn, may_bounce, wants_dsn};
pub use id::{IdGenerator, QueueId};
pub use scheduler::{QueueHandle, QueueStats, SchedulerConfig, start};
pub use spool::{Content, QueuedMessage, RcptState, RcptStatus, Spool, rename_noreplace, unix_now};
pub use sync::Syncer;
pub use transport::{DeliveryJob, Failure, Outcome, Transport};
