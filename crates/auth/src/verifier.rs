//! What the server calls to check a password.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::Users;
use crate::password::{DUMMY_HASH, verify_password};

/// Verifications that may run at once: each takes about 19 MiB and tens of milliseconds.
const DEFAULT_CONCURRENCY: usize = 2;

/// Checks user names and passwords against the users file for AUTH. argon2 runs on tokio's
/// blocking pool, at most two at a time (a burst of logins queues here instead of stalling
/// other sessions or exhausting memory). An unknown user costs the same argon2 work as a known
/// one, so the time an answer takes does not reveal whether a user exists.
#[derive(Debug, Clone)]
pub struct Verifier {
    users: Arc<Users>,
    permits: Arc<Semaphore>,
}

impl Verifier {
    /// A verifier over `users`, running at most two verifications at once.
    pub fn new(users: Arc<Users>) -> Verifier {
        Verifier::with_concurrency(users, DEFAULT_CONCURRENCY)
    }

    /// A verifier over `users`, running at most `concurrency` (at least 1) verifications at once.
    pub fn with_concurrency(users: Arc<Users>, concurrency: usize) -> Verifier {
        Verifier {
            users,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
        }
    }

    /// The users file behind this verifier (e.g. for sender-ownership checks).
    pub fn users(&self) -> &Arc<Users> {
        &self.users
    }

    /// Whether `address` (case-insensitive) is a user whose password is `password`. Must be
    /// called inside a tokio runtime. Waits for a free slot, then runs the file check and argon2
    /// on the blocking pool; if this future is dropped, the running verification still finishes
    /// before its slot is given back.
    pub async fn verify(&self, address: &str, password: &str) -> bool {
        let Ok(permit) = self.permits.clone().acquire_owned().await else {
            return false;
        };
        let users = Arc::clone(&self.users);
        let address = address.to_string();
        let password = password.to_string();
        let work = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            match users.lookup(&address) {
                Some(hash) => verify_password(&hash, &password),
                None => {
                    // Same work as for a real user; the answer is no in any case.
                    let _ = verify_password(DUMMY_HASH, &password);
                    false
                }
            }
        });
        work.await.unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verifies_known_and_unknown_users() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        let hash = crate::hash_password("s3cret").unwrap();
        crate::add_user(&path, "alice@example.test", &hash).unwrap();
        let verifier = Verifier::new(Arc::new(Users::open(&path).unwrap()));

        assert!(verifier.verify("alice@example.test", "s3cret").await);
        assert!(verifier.verify("ALICE@Example.Test", "s3cret").await);
        assert!(!verifier.verify("alice@example.test", "wrong").await);
        // An unknown user takes argon2 time too.
        let start = Instant::now();
        assert!(!verifier.verify("bob@example.test", "s3cret").await);
        assert!(start.elapsed() > Duration::from_millis(5));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_most_n_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let users = Arc::new(Users::open(dir.path().join("users")).unwrap());
        let verifier = Verifier::with_concurrency(users, 1);
        // Take the only slot: a verification must wait for it.
        let held = verifier.permits.clone().acquire_owned().await.unwrap();
        let v = verifier.clone();
        let pending = tokio::spawn(async move { v.verify("a@example.test", "x").await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!pending.is_finished());
        drop(held);
        assert!(!pending.await.unwrap());
        assert_eq!(verifier.permits.available_permits(), 1);
    }
}
