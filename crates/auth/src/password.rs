//! argon2id password hashes as PHC strings (`$argon2id$v=19$m=19456,t=2,p=1$salt$hash`).

use argon2::{Argon2, PasswordHash, PasswordHasher, PasswordVerifier};

use crate::Error;

/// A valid argon2id hash with the default parameters, of a password nobody knows. Verifying an
/// unknown user's password against it costs the same as for a real user, so the time an AUTH
/// takes does not reveal whether the user exists.
pub const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$Aq40ToYrczZfvFMnCOhC3Q$5i02b1YrO9dxZ3Rz/9H6VUn45HjDNNW8ww4AxzuJUds";

/// Hashes `password` with argon2id (the argon2 crate's default parameters: 19 MiB, 2 passes,
/// 1 lane) and a fresh random salt, and returns the PHC string. Takes tens of milliseconds.
pub fn hash_password(password: &str) -> Result<String, Error> {
    // argon2 0.6: `hash_password` draws its own salt from the system RNG.
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|hash| hash.to_string())
        .map_err(|e| Error::Hash(e.to_string()))
}

/// Whether `password` matches the PHC string `hash`. The parameters (and the argon2 variant) are
/// taken from the hash. A malformed hash never matches. Takes tens of milliseconds.
pub fn verify_password(hash: &str, password: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) if is_argon2(&parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        _ => false,
    }
}

/// Whether `hash` is a well-formed argon2 PHC string (what the users file accepts).
pub(crate) fn is_valid_hash(hash: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| is_argon2(&parsed) && parsed.hash.is_some())
}

fn is_argon2(parsed: &PasswordHash) -> bool {
    parsed.algorithm.as_str().starts_with("argon2")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_then_verify() {
        let hash = hash_password("correct horse").unwrap();
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(is_valid_hash(&hash));
        assert!(verify_password(&hash, "correct horse"));
        assert!(!verify_password(&hash, "correct horse "));
        // A fresh salt each time.
        assert_ne!(hash, hash_password("correct horse").unwrap());
    }

    #[test]
    fn malformed_hashes_never_match() {
        for hash in [
            "",
            "plain",
            "$argon2id$",
            "$argon2id$v=19$m=19456,t=2,p=1$Aq40ToYrczZfvFMnCOhC3Q",
            "$2b$12$abcdefghijklmnopqrstuv",
            "$argon2id$v=19$m=19456,t=2,p=1$!!!$5i02b1YrO9dxZ3Rz",
        ] {
            assert!(!verify_password(hash, ""), "{hash:?}");
            assert!(!is_valid_hash(hash), "{hash:?}");
        }
    }

    #[test]
    fn dummy_hash_is_valid_and_matches_nothing_simple() {
        assert!(is_valid_hash(DUMMY_HASH));
        assert!(!verify_password(DUMMY_HASH, ""));
        assert!(!verify_password(DUMMY_HASH, "password"));
    }
}
