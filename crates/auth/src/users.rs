//! The users file: one `address:argon2id-PHC-hash` per line.
//!
//! ```text
//! # estafeta users, managed by `estafeta user add|passwd|del`
//! alice@example.org:$argon2id$v=19$m=19456,t=2,p=1$…$…
//! ```
//!
//! `#` starts a comment line; blank lines are ignored; addresses are compared case-insensitively
//! and stored in lower case. A malformed line is skipped with a warning naming `file:line`.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use crate::Error;
use crate::password::is_valid_hash;

/// How often, at most, [`Users`] looks at the file to see whether it changed.
const RECHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Longest address accepted (RFC 5321 §4.5.3.1.3: a path is at most 256 octets with its brackets).
const MAX_ADDRESS_LEN: usize = 254;

/// The users who may authenticate, read from the users file and kept up to date with it: the
/// file is looked at (`stat`) at most once a second and read again when its modification time,
/// length or inode changed, so `estafeta user …` takes effect without a restart. A reload reads
/// and parses the whole file before swapping it in; a lookup never sees a half-read file.
#[derive(Debug)]
pub struct Users {
    path: PathBuf,
    current: RwLock<Arc<Snapshot>>,
    check: Mutex<Check>,
}

/// One parse of the file.
#[derive(Debug, Default)]
struct Snapshot {
    /// Lower-cased address → PHC hash.
    hashes: HashMap<String, String>,
    /// `file:line: problem` for each skipped line.
    warnings: Vec<String>,
}

/// When the file was last looked at, and what it looked like then.
#[derive(Debug)]
struct Check {
    at: Instant,
    stamp: Option<Stamp>,
}

/// What tells us the file changed: a rename gives a new inode, an in-place edit a new mtime or length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: Option<SystemTime>,
}

impl Stamp {
    fn of(meta: &fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: meta.modified().ok(),
        }
    }
}

impl Users {
    /// Reads the users file at `path`. A missing file means no users (it may be created later and
    /// is then picked up); any other read error is returned.
    pub fn open(path: impl Into<PathBuf>) -> Result<Users, Error> {
        let path = path.into();
        let (stamp, snapshot) = match load(&path)? {
            Some((stamp, snapshot)) => (Some(stamp), snapshot),
            None => (None, Snapshot::default()),
        };
        log_warnings(&snapshot);
        Ok(Users {
            path,
            current: RwLock::new(Arc::new(snapshot)),
            check: Mutex::new(Check {
                at: Instant::now(),
                stamp,
            }),
        })
    }

    /// The users file this was opened on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The password hash (PHC string) of `address`, compared case-insensitively; `None` for an
    /// unknown user. Reads the users as last published (at open, then by [`Users::check`],
    /// which the server's watcher calls every second): no I/O, no lock held while reading
    /// the file, so that the RCPT and AUTH paths never wait for the disk.
    pub fn lookup(&self, address: &str) -> Option<String> {
        self.snapshot()
            .hashes
            .get(&address.to_ascii_lowercase())
            .cloned()
    }

    /// Looks at the file and publishes a new snapshot when it changed (at most once a
    /// second): the owner's watcher calls it, from blocking code (it may `stat` and read).
    pub fn check(&self) {
        self.refresh(Instant::now());
    }

    /// Whether `address` is a user (case-insensitive).
    pub fn contains(&self, address: &str) -> bool {
        self.lookup(address).is_some()
    }

    /// Every address in the file (lower case, sorted).
    pub fn addresses(&self) -> Vec<String> {
        self.refresh(Instant::now());
        let mut all: Vec<String> = self.snapshot().hashes.keys().cloned().collect();
        all.sort();
        all
    }

    /// The problems found in the file at its last (re)load, one `file:line: problem` each.
    pub fn warnings(&self) -> Vec<String> {
        self.refresh(Instant::now());
        self.snapshot().warnings.clone()
    }

    #[cfg(test)]
    pub(crate) fn lookup_at(&self, address: &str, now: Instant) -> Option<String> {
        self.refresh(now);
        self.snapshot()
            .hashes
            .get(&address.to_ascii_lowercase())
            .cloned()
    }

    fn snapshot(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Reloads the file if it is time to look at it again (`now`) and it changed.
    pub(crate) fn refresh(&self, now: Instant) {
        let mut check = self.check.lock().unwrap_or_else(PoisonError::into_inner);
        if now.saturating_duration_since(check.at) < RECHECK_INTERVAL {
            return;
        }
        check.at = now;
        let stamp = match fs::metadata(&self.path) {
            Ok(meta) => Some(Stamp::of(&meta)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::warn!(path = %self.path.display(), "users file: {e}; keeping the users already loaded");
                return;
            }
        };
        if stamp == check.stamp {
            return;
        }
        let (stamp, snapshot) = match load(&self.path) {
            Ok(Some((stamp, snapshot))) => (Some(stamp), snapshot),
            Ok(None) => (None, Snapshot::default()),
            Err(e) => {
                tracing::warn!("users file: {e}; keeping the users already loaded");
                return;
            }
        };
        log_warnings(&snapshot);
        tracing::info!(
            path = %self.path.display(),
            users = snapshot.hashes.len(),
            "users file reloaded"
        );
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(snapshot);
        check.stamp = stamp;
    }
}

fn log_warnings(snapshot: &Snapshot) {
    for warning in &snapshot.warnings {
        tracing::warn!("{warning}");
    }
}

/// Reads and parses the whole file; `None` when it does not exist. The stamp is taken from the
/// open file itself, so it describes exactly the content that was read.
fn load(path: &Path) -> Result<Option<(Stamp, Snapshot)>, Error> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(path, e)),
    };
    let stamp = Stamp::of(&file.metadata().map_err(|e| Error::io(path, e))?);
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| Error::io(path, e))?;
    Ok(Some((stamp, parse(path, &text))))
}

/// One line of the file, classified.
#[derive(Debug, PartialEq, Eq)]
enum Line<'a> {
    /// Comment or blank.
    Ignored,
    /// A user: lower-cased address and hash.
    User(String, &'a str),
    /// Skipped, with the reason.
    Malformed(&'static str),
}

fn classify(line: &str) -> Line<'_> {
    let trimmed = line.trim();
    if trimmed.is_empty() || trimmed.starts_with('#') {
        return Line::Ignored;
    }
    let Some((address, hash)) = trimmed.split_once(':') else {
        return Line::Malformed("expected address:hash");
    };
    if let Err(reason) = check_address(address) {
        return Line::Malformed(reason);
    }
    if !is_valid_hash(hash) {
        return Line::Malformed("not an argon2 PHC hash");
    }
    Line::User(address.to_ascii_lowercase(), hash)
}

fn parse(path: &Path, text: &str) -> Snapshot {
    let mut snapshot = Snapshot::default();
    for (index, line) in text.lines().enumerate() {
        let number = index + 1;
        match classify(line) {
            Line::Ignored => {}
            Line::User(address, hash) => match snapshot.hashes.entry(address) {
                Entry::Occupied(seen) => snapshot.warnings.push(format!(
                    "{}:{number}: duplicate user {}, skipped (the first line counts)",
                    path.display(),
                    seen.key()
                )),
                Entry::Vacant(slot) => {
                    slot.insert(hash.to_string());
                }
            },
            Line::Malformed(reason) => snapshot.warnings.push(format!(
                "{}:{number}: malformed line skipped: {reason}",
                path.display()
            )),
        }
    }
    snapshot
}

/// Checks that `address` can be a user name: `local@domain`, both parts non-empty, one `@`, no
/// `:`, whitespace or control characters, at most 254 characters.
pub fn validate_address(address: &str) -> Result<(), Error> {
    check_address(address).map_err(|reason| Error::InvalidAddress {
        address: address.to_string(),
        reason,
    })
}

fn check_address(address: &str) -> Result<(), &'static str> {
    if address.len() > MAX_ADDRESS_LEN {
        return Err("longer than 254 characters");
    }
    if address.contains(':') {
        return Err("contains ':'");
    }
    if address.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("contains whitespace or control characters");
    }
    match address.split_once('@') {
        Some((local, domain)) if !local.is_empty() && !domain.is_empty() => {
            if domain.contains('@') {
                Err("more than one '@'")
            } else {
                Ok(())
            }
        }
        _ => Err("expected local@domain"),
    }
}

/// Adds `address` with `password_hash` to the users file at `path` (created, mode 0600, with its
/// directory, if missing). Error if the address is already there. Atomic: see [`set_password`].
pub fn add_user(path: &Path, address: &str, password_hash: &str) -> Result<(), Error> {
    let address = checked(address)?;
    check_hash(password_hash)?;
    edit(path, |lines| {
        if lines.iter().any(|line| is_user(line, &address)) {
            return Err(Error::UserExists {
                address: address.clone(),
                path: path.to_path_buf(),
            });
        }
        lines.push(format!("{address}:{password_hash}"));
        Ok(())
    })
}

/// Replaces the password hash of `address` in the users file at `path`. Error if the address is
/// absent. Like every edit: the file is read, changed in memory (comments and other lines kept
/// as they are), written to `path.tmp` (mode 0600), fsynced, renamed over `path`, and the
/// directory fsynced; concurrent edits are serialised by a lock on the directory.
pub fn set_password(path: &Path, address: &str, password_hash: &str) -> Result<(), Error> {
    let address = checked(address)?;
    check_hash(password_hash)?;
    edit(path, |lines| {
        let mut found = false;
        for line in lines.iter_mut().filter(|line| is_user(line, &address)) {
            *line = format!("{address}:{password_hash}");
            found = true;
        }
        if found {
            Ok(())
        } else {
            Err(Error::NoSuchUser {
                address: address.clone(),
                path: path.to_path_buf(),
            })
        }
    })
}

/// Removes `address` (every line of it) from the users file at `path`. Error if absent.
/// Atomic: see [`set_password`].
pub fn delete_user(path: &Path, address: &str) -> Result<(), Error> {
    let address = checked(address)?;
    edit(path, |lines| {
        let before = lines.len();
        lines.retain(|line| !is_user(line, &address));
        if lines.len() < before {
            Ok(())
        } else {
            Err(Error::NoSuchUser {
                address: address.clone(),
                path: path.to_path_buf(),
            })
        }
    })
}

fn checked(address: &str) -> Result<String, Error> {
    validate_address(address)?;
    Ok(address.to_ascii_lowercase())
}

fn check_hash(hash: &str) -> Result<(), Error> {
    if is_valid_hash(hash) && !hash.contains(char::is_whitespace) {
        Ok(())
    } else {
        Err(Error::InvalidHash)
    }
}

fn is_user(line: &str, address: &str) -> bool {
    matches!(classify(line), Line::User(a, _) if a == address)
}

/// `path.tmp` beside `path`.
fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Read, change, write atomically.
fn edit(
    path: &Path,
    change: impl FnOnce(&mut Vec<String>) -> Result<(), Error>,
) -> Result<(), Error> {
    if path.file_name().is_none() {
        return Err(Error::io(
            path,
            io::Error::new(io::ErrorKind::InvalidInput, "not a file name"),
        ));
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let dir_file = File::open(&dir).map_err(|e| Error::io(&dir, e))?;
    // Serialise concurrent `estafeta user …` commands: an exclusive lock on the directory,
    // released when `dir_file` is closed.
    // SAFETY: flock on a file descriptor we own; no memory is passed.
    if unsafe { libc::flock(dir_file.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(Error::io(&dir, io::Error::last_os_error()));
    }

    let (text, old_meta) = match fs::read_to_string(path) {
        Ok(text) => (text, fs::metadata(path).ok()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => (String::new(), None),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    change(&mut lines)?;
    let mut out = lines.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }

    let tmp = tmp_path(path);
    match fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(&tmp, e)),
    }
    let result = write_and_rename(&tmp, path, &out, old_meta.as_ref());
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result?;
    dir_file.sync_all().map_err(|e| Error::io(&dir, e))
}

fn write_and_rename(
    tmp: &Path,
    path: &Path,
    content: &str,
    old: Option<&fs::Metadata>,
) -> Result<(), Error> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(tmp)
        .map_err(|e| Error::io(tmp, e))?;
    // The umask may have taken bits away; the file is 0600 whatever it is.
    file.set_permissions(fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(tmp, e))?;
    if let Some(old) = old {
        // Keep the owner and group of the file being replaced, so that `sudo estafeta user add`
        // does not leave a root-owned file the server (running as its own user) cannot read.
        // Only root may give a file away; for anyone else this is a no-op or refused, and then
        // the file simply belongs to whoever ran the command.
        // SAFETY: fchown on a file descriptor we own; no memory is passed.
        let _ = unsafe { libc::fchown(file.as_raw_fd(), old.uid(), old.gid()) };
    }
    file.write_all(content.as_bytes())
        .map_err(|e| Error::io(tmp, e))?;
    file.sync_all().map_err(|e| Error::io(tmp, e))?;
    drop(file);
    fs::rename(tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash_password;

    const HASH_A: &str = "$argon2id$v=19$m=19456,t=2,p=1$Aq40ToYrczZfvFMnCOhC3Q$5i02b1YrO9dxZ3Rz/9H6VUn45HjDNNW8ww4AxzuJUds";
    const HASH_B: &str = "$argon2id$v=19$m=19456,t=2,p=1$Q8fEgJdzwsdoFgDzkeJnJw$qHvtqgygy9OajC7sz+JXJrpS+H6VSL+nOf6z6r3EJSQ";

    fn later(secs: u64) -> Instant {
        Instant::now() + Duration::from_secs(secs)
    }

    #[test]
    fn parses_comments_blank_lines_case_and_malformed_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        let text = format!(
            "# users\n\n  # indented comment\nAlice@Example.ORG:{HASH_A}\nbob@example.org:{HASH_B}\r\n\
             no-colon-here\nnobody:{HASH_A}\ncarol@example.org:not-a-hash\nalice@example.org:{HASH_B}\n \n"
        );
        fs::write(&path, text).unwrap();
        let users = Users::open(&path).unwrap();
        assert_eq!(users.lookup("alice@example.org").as_deref(), Some(HASH_A));
        assert_eq!(users.lookup("ALICE@example.org").as_deref(), Some(HASH_A));
        assert_eq!(users.lookup("bob@EXAMPLE.org").as_deref(), Some(HASH_B));
        assert!(users.contains("bob@example.org"));
        assert!(!users.contains("carol@example.org"));
        assert!(!users.contains("nobody"));
        assert_eq!(
            users.addresses(),
            vec![
                "alice@example.org".to_string(),
                "bob@example.org".to_string()
            ]
        );
        let warnings = users.warnings();
        let p = path.display();
        assert_eq!(
            warnings,
            vec![
                format!("{p}:6: malformed line skipped: expected address:hash"),
                format!("{p}:7: malformed line skipped: expected local@domain"),
                format!("{p}:8: malformed line skipped: not an argon2 PHC hash"),
                format!("{p}:9: duplicate user alice@example.org, skipped (the first line counts)"),
            ]
        );
    }

    #[test]
    fn missing_file_is_no_users_and_is_picked_up_when_created() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        let users = Users::open(&path).unwrap();
        assert!(users.addresses().is_empty());
        fs::write(&path, format!("a@example.test:{HASH_A}\n")).unwrap();
        // Not looked at again within the second...
        assert_eq!(users.lookup_at("a@example.test", Instant::now()), None);
        // ...but after it.
        assert_eq!(
            users.lookup_at("a@example.test", later(2)).as_deref(),
            Some(HASH_A)
        );
        // Removed: no users again.
        fs::remove_file(&path).unwrap();
        assert_eq!(users.lookup_at("a@example.test", later(4)), None);
    }

    #[test]
    fn reloads_after_an_in_place_change_of_mtime_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        fs::write(&path, format!("a@example.test:{HASH_A}\n")).unwrap();
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(old)
            .unwrap();
        let users = Users::open(&path).unwrap();
        assert_eq!(users.lookup("a@example.test").as_deref(), Some(HASH_A));
        // Same length, same inode: only the mtime tells.
        let mut f = File::options().write(true).open(&path).unwrap();
        f.write_all(format!("a@example.test:{HASH_B}\n").as_bytes())
            .unwrap();
        f.set_modified(old + Duration::from_secs(1)).unwrap();
        drop(f);
        assert_eq!(
            users.lookup_at("a@example.test", later(2)).as_deref(),
            Some(HASH_B)
        );
    }

    #[test]
    fn edits_keep_other_lines_and_are_seen_by_an_open_users() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("etc").join("users");
        // Created with its directory, mode 0600.
        add_user(&path, "Alice@Example.test", HASH_A).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("alice@example.test:{HASH_A}\n")
        );
        let users = Users::open(&path).unwrap();
        assert!(users.contains("alice@example.test"));

        // Comments and malformed lines survive edits untouched.
        let mut text = fs::read_to_string(&path).unwrap();
        text.insert_str(0, "# the users\n\nbroken line\n");
        fs::write(&path, &text).unwrap();

        add_user(&path, "bob@example.test", HASH_B).unwrap();
        assert!(matches!(
            add_user(&path, "BOB@example.test", HASH_A),
            Err(Error::UserExists { .. })
        ));
        set_password(&path, "ALICE@example.test", HASH_B).unwrap();
        assert!(matches!(
            set_password(&path, "carol@example.test", HASH_B),
            Err(Error::NoSuchUser { .. })
        ));
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!(
                "# the users\n\nbroken line\nalice@example.test:{HASH_B}\nbob@example.test:{HASH_B}\n"
            )
        );
        let now = later(2);
        assert_eq!(
            users.lookup_at("alice@example.test", now).as_deref(),
            Some(HASH_B)
        );
        assert_eq!(
            users.lookup_at("bob@example.test", now).as_deref(),
            Some(HASH_B)
        );

        delete_user(&path, "alice@EXAMPLE.test").unwrap();
        assert!(matches!(
            delete_user(&path, "alice@example.test"),
            Err(Error::NoSuchUser { .. })
        ));
        assert_eq!(
            fs::read_to_string(&path).unwrap(),
            format!("# the users\n\nbroken line\nbob@example.test:{HASH_B}\n")
        );
        assert_eq!(users.lookup_at("alice@example.test", later(4)), None);
        assert!(!tmp_path(&path).exists());
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
    }

    #[test]
    fn edits_refuse_bad_addresses_and_hashes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        let long = format!("{}@example.test", "a".repeat(250));
        for address in [
            "",
            "alice",
            "@example.test",
            "alice@",
            "a:b@example.test",
            "a b@example.test",
            "a@b@example.test",
            "a\t@example.test",
            long.as_str(),
        ] {
            assert!(
                matches!(
                    add_user(&path, address, HASH_A),
                    Err(Error::InvalidAddress { .. })
                ),
                "{address:?}"
            );
        }
        assert!(matches!(
            add_user(&path, "a@example.test", "secret"),
            Err(Error::InvalidHash)
        ));
        assert!(!path.exists());
        validate_address("a.b+c@sub.example.test").unwrap();
    }

    #[test]
    fn a_real_hash_round_trips_through_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users");
        let hash = hash_password("s3cret").unwrap();
        add_user(&path, "a@example.test", &hash).unwrap();
        let users = Users::open(&path).unwrap();
        let stored = users.lookup("a@example.test").unwrap();
        assert!(crate::verify_password(&stored, "s3cret"));
    }
}
