//! The error type of the users file and password hashing.

use std::path::PathBuf;

/// What can go wrong reading or editing the users file, or hashing a password.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file-system operation on `path` failed.
    #[error("{path}: {cause}")]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error (in the message; not a `source()` as well, which would print
        /// it twice in an error chain).
        cause: std::io::Error,
    },
    /// The address cannot be a user name (the reason says why).
    #[error("invalid address {address:?}: {reason}")]
    InvalidAddress {
        /// The address as given.
        address: String,
        /// Why it was refused.
        reason: &'static str,
    },
    /// `add_user` for an address that is already in the file.
    #[error("{address} already exists in {path}")]
    UserExists {
        /// The (lower-cased) address.
        address: String,
        /// The users file.
        path: PathBuf,
    },
    /// `set_password` or `delete_user` for an address that is not in the file.
    #[error("no user {address} in {path}")]
    NoSuchUser {
        /// The (lower-cased) address.
        address: String,
        /// The users file.
        path: PathBuf,
    },
    /// The value given as a password hash is not an argon2 PHC string.
    #[error("not an argon2 PHC password hash")]
    InvalidHash,
    /// argon2 failed to hash a password (e.g. the system RNG failed).
    #[error("hashing the password failed: {0}")]
    Hash(String),
}

impl Error {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            cause: source,
        }
    }
}
