//! estafeta-auth: submission authentication.
//!
//! - [`Users`]: the users file (`address:argon2id-hash` per line), reloaded when it changes on disk;
//!   [`add_user`], [`set_password`] and [`delete_user`] edit it atomically for `estafeta user …`.
//! - [`hash_password`] and [`verify_password`]: argon2id PHC strings.
//! - [`Verifier`]: what the server calls for AUTH; argon2 on the blocking pool behind a semaphore,
//!   and the same work for unknown users as for known ones.
//! - [`sasl`]: RFC 4616 PLAIN and the LOGIN mechanism, pure decoding functions.
//! - [`Throttle`]: per-client-address failure counter with a back-off delay (brute-force defence).

#![warn(missing_docs)]

mod error;
mod password;
pub mod sasl;
mod throttle;
mod users;
mod verifier;

pub use error::Error;
pub use password::{DUMMY_HASH, hash_password, verify_password};
pub use throttle::Throttle;
pub use users::{Users, add_user, delete_user, set_password, validate_address};
pub use verifier::Verifier;
