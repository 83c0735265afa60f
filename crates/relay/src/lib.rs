//! estafeta-relay: remote delivery. Where to connect (MX resolution, `resolve`) is a step of
//! its own, separate from the SMTP client (`client`).

pub mod client;
pub mod dane;
pub mod mtasts;
pub mod opening;
pub mod remote;
pub mod resolve;
pub mod tlsrpt;
pub mod transaction;
