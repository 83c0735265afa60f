//! estafeta-maildir: local delivery into Maildir folders.
//!
//! Each delivery writes `tmp/NAME` (created exclusively, mode 0600) with `Return-Path` and
//! `Delivered-To` prepended, makes it durable, renames it into `new/NAME` and makes the rename
//! durable (both through the group-commit syncer, so that concurrent deliveries share their
//! syncs). Only then is the recipient reported delivered. Any error is temporary: the message
//! stays queued and is retried. Line endings are stored as received (CRLF), which Dovecot and
//! other Maildir readers accept, so the body is byte-identical to what the client sent.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use estafeta_queue::Syncer;

/// Why a mailbox path could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// The user or domain name would escape the mail directory or is not a usable file name.
    Unsafe(String),
}

impl std::fmt::Display for PathError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathError::Unsafe(s) => write!(f, "unsafe mailbox name {s:?}"),
        }
    }
}

/// A name usable as one path component: not empty, not `.`/`..`, no `/` or NUL, no
/// leading dot (hidden files and Maildir++ folders start with one).
fn safe_component(s: &str) -> bool {
    !s.is_empty() && !s.starts_with('.') && !s.contains(['/', '\0']) && s.len() <= 255
}

/// Expands the Maildir template: `{domain}` and `{user}` (already lower-cased by the caller).
pub fn mailbox_path(template: &str, domain: &str, user: &str) -> Result<PathBuf, PathError> {
    if !safe_component(domain) {
        return Err(PathError::Unsafe(domain.to_string()));
    }
    if !safe_component(user) {
        return Err(PathError::Unsafe(user.to_string()));
    }
    Ok(PathBuf::from(
        template.replace("{domain}", domain).replace("{user}", user),
    ))
}

/// One recipient of a local delivery.
#[derive(Debug, Clone)]
pub struct Target {
    /// The Maildir folder (holding tmp/, new/, cur/).
    pub maildir: PathBuf,
    /// The address written into `Delivered-To:`.
    pub delivered_to: String,
    /// A name unique to this message and recipient (`E<queue ID>R<index>`): the file is named
    /// after it, so that a delivery repeated after a crash finds the first one and is not made
    /// twice. `None`: a fresh unique name.
    pub key: Option<String>,
    /// Also look in `cur/` for a delivery made before a crash (a reader may have moved it
    /// there meanwhile): a directory listing, so only for recovered messages.
    pub look_in_cur: bool,
    /// No earlier attempt can have written this delivery (the message's first attempt): the
    /// look for it in `new/` is skipped. A name found taken anyway (another message's, after
    /// the clock was set back) is never replaced: the file gets a fresh unique name.
    pub fresh: bool,
}

/// The Maildir delivery agent.
#[derive(Debug)]
pub struct Maildir {
    syncer: Syncer,
    /// Maildir folders known to exist with their tmp/, new/ and cur/ (saves stats per delivery).
    known: std::sync::Mutex<std::collections::HashSet<PathBuf>>,
    host: String,
    pid: u32,
    seq: AtomicU64,
}

impl Maildir {
    /// A delivery agent naming its files after `hostname`.
    pub fn new(syncer: Syncer, hostname: &str) -> Self {
        // Maildir file names must not hold '/' or ':' (the info separator).
        let host = hostname.replace('/', "\\057").replace(':', "\\072");
        Maildir {
            syncer,
            known: Default::default(),
            host,
            pid: std::process::id(),
            seq: AtomicU64::new(0),
        }
    }

    /// A unique file name: `SECONDS.MmicrosPpidQseq.host` (the modern Maildir convention).
    fn unique_name(&self) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        format!(
            "{}.M{}P{}Q{}.{}",
            now.as_secs(),
            now.subsec_micros(),
            self.pid,
            seq,
            self.host
        )
    }

    /// Delivers `content` to every target; one result per target, in order (the path of the
    /// file in `new/` or the error). Files of all targets are written first, then one durable
    /// sync covers them all, then the renames, then one more sync.
    pub async fn deliver(
        &self,
        targets: &[Target],
        return_path: &str,
        content: &[u8],
    ) -> Vec<io::Result<PathBuf>> {
        let mut files = Vec::new();
        let mut dirs: Vec<PathBuf> = Vec::new();
        // Already delivered before a crash (the same name is in new/, or in cur/): reported
        // delivered, not written again — and its folder flushed with the renames below, since
        // the attempt that renamed it may have failed before its own flush.
        let done: Vec<Option<PathBuf>> = targets
            .iter()
            .map(|t| {
                if t.fresh {
                    None
                } else {
                    self.already(t, content)
                }
            })
            .collect();
        for dir in done.iter().flatten().filter_map(|p| p.parent()) {
            if !dirs.iter().any(|d| d == dir) {
                dirs.push(dir.to_path_buf());
            }
        }
        let mut staged: Vec<io::Result<(PathBuf, PathBuf)>> = targets
            .iter()
            .zip(&done)
            .map(|(t, done)| match done {
                Some(path) => Ok((PathBuf::new(), path.clone())),
                None => self
                    .write_tmp(t, return_path, content)
                    .map(|(tmp, new, f)| {
                        files.push(f);
                        (tmp, new)
                    }),
            })
            .collect();
        // The data of every tmp/ file is durable before any of them appears in new/.
        if !files.is_empty()
            && let Err(e) = self.syncer.sync(files, Vec::new()).await
        {
            return fail_all(&staged, &e);
        }
        for s in staged.iter_mut() {
            if let Ok((tmp, new)) = s
                && !tmp.as_os_str().is_empty()
            {
                match self.rename_into_new(tmp, new) {
                    Ok(()) => {
                        if let Some(dir) = new.parent()
                            && !dirs.iter().any(|d| d == dir)
                        {
                            dirs.push(dir.to_path_buf());
                        }
                    }
                    Err(e) => {
                        let _ = fs::remove_file(&*tmp);
                        *s = Err(e);
                    }
                }
            }
        }
        // Then the renames into new/ are durable before the delivery is reported.
        if !dirs.is_empty()
            && let Err(e) = self.syncer.sync(Vec::new(), dirs).await
        {
            return fail_all(&staged, &e);
        }
        staged.into_iter().map(|s| s.map(|(_, new)| new)).collect()
    }

    /// Renames `tmp` into `new` without ever replacing a file there: a name already taken
    /// (by another message, after the clock was set back and a queue ID came again) gets a
    /// unique one instead, and `new` is updated to it.
    fn rename_into_new(&self, tmp: &Path, new: &mut PathBuf) -> io::Result<()> {
        match estafeta_queue::rename_noreplace(tmp, new) {
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let other = new.with_file_name(self.unique_name());
                estafeta_queue::rename_noreplace(tmp, &other)?;
                *new = other;
                Ok(())
            }
            r => r,
        }
    }

    /// The file name of a delivery to `target`.
    fn name(&self, target: &Target) -> String {
        match &target.key {
            Some(key) => format!("{key}.{}", self.host),
            None => self.unique_name(),
        }
    }

    /// Where the delivery to `target` already is, when a crash came after it and before its
    /// record: `new/NAME`, or `cur/NAME:2,…` when `look_in_cur` — provided the file holds
    /// this message: a file of that name from another message (its queue ID came again after
    /// the clock was set back) is not taken for this delivery.
    fn already(&self, target: &Target, content: &[u8]) -> Option<PathBuf> {
        let key = target.key.as_ref()?;
        let name = format!("{key}.{}", self.host);
        let new = target.maildir.join("new").join(&name);
        if new.exists() {
            return holds(&new, content).then_some(new);
        }
        if target.look_in_cur {
            let prefix = format!("{name}:");
            let found = fs::read_dir(target.maildir.join("cur"))
                .ok()?
                .filter_map(|e| e.ok())
                .find(|e| {
                    let n = e.file_name();
                    let n = n.to_string_lossy();
                    n == name || n.starts_with(&prefix)
                })?;
            let path = found.path();
            return holds(&path, content).then_some(path);
        }
        None
    }

    /// Creates the folders if needed and writes `tmp/NAME`. Returns (tmp path, new path, the
    /// file, for the syncer).
    fn write_tmp(
        &self,
        target: &Target,
        return_path: &str,
        content: &[u8],
    ) -> io::Result<(PathBuf, PathBuf, std::fs::File)> {
        let root = &target.maildir;
        let name = self.name(target);
        let tmp = root.join("tmp").join(&name);
        let new = root.join("new").join(&name);
        let head = format!(
            "Return-Path: <{}>\r\nDelivered-To: {}\r\n",
            return_path, target.delivered_to
        );
        let known = self.is_known(root);
        let open = || {
            OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
        };
        let mut f = match open() {
            Ok(f) => f,
            // A delivery by this name was being written when the server stopped: the file in
            // tmp/ never reached new/, so it is written again.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && target.key.is_some() => {
                fs::remove_file(&tmp)?;
                open()?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // First delivery to this folder, or it was removed: create it.
                let mut b = fs::DirBuilder::new();
                b.recursive(true).mode(0o700);
                for sub in ["tmp", "new", "cur"] {
                    b.create(root.join(sub))?;
                }
                open()?
            }
            Err(e) => return Err(e),
        };
        if !known {
            // A folder created by someone else may lack new/ or cur/.
            for sub in ["new", "cur"] {
                if !root.join(sub).is_dir() {
                    fs::DirBuilder::new()
                        .recursive(true)
                        .mode(0o700)
                        .create(root.join(sub))?;
                }
            }
        }
        // The added header and the message in one write, without copying the message; a
        // large (mapped) message a block at a time, its pages let go as they are written.
        let written = if content.len() > LARGE {
            f.write_all(head.as_bytes()).and_then(|()| {
                estafeta_queue::blocks(content, LARGE).try_for_each(|b| f.write_all(b))
            })
        } else {
            write_all_vectored(&mut f, &[head.as_bytes(), content])
        };
        match written {
            Ok(()) => {
                if !known {
                    self.remember(root);
                }
                Ok((tmp, new, f))
            }
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    fn is_known(&self, root: &Path) -> bool {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        known.contains(root)
    }

    fn remember(&self, root: &Path) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        // Bounded: a server with more mailboxes than this just checks more often.
        if known.len() >= 100_000 {
            known.clear();
        }
        known.insert(root.to_path_buf());
    }
}

/// Whether the Maildir file at `path` holds `content`: its first bytes (our Received header,
/// with the queue ID, the date and the client) follow the `Return-Path:` and `Delivered-To:`
/// lines the delivery added. Read errors count as "no".
fn holds(path: &Path, content: &[u8]) -> bool {
    use std::io::Read;
    const HEAD: usize = 2048;
    let probe = &content[..content.len().min(256)];
    let mut buf = Vec::with_capacity(HEAD + probe.len());
    let read = fs::File::open(path)
        .and_then(|f| f.take((HEAD + probe.len()) as u64).read_to_end(&mut buf));
    read.is_ok() && (probe.is_empty() || buf.windows(probe.len()).any(|w| w == probe))
}

/// Writes every part, in order, with as few `writev` calls as the kernel allows.
/// Messages above this size are written in blocks of it.
const LARGE: usize = 1 << 20;

fn write_all_vectored(f: &mut std::fs::File, parts: &[&[u8]]) -> io::Result<()> {
    let mut parts: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    let mut first = 0;
    while first < parts.len() {
        let slices: Vec<io::IoSlice<'_>> =
            parts[first..].iter().map(|p| io::IoSlice::new(p)).collect();
        let mut n = match f.write_vectored(&slices) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        while first < parts.len() && n >= parts[first].len() {
            n -= parts[first].len();
            first += 1;
        }
        if n > 0 {
            parts[first] = &parts[first][n..];
        }
    }
    Ok(())
}

fn fail_all<T>(staged: &[io::Result<T>], e: &io::Error) -> Vec<io::Result<PathBuf>> {
    staged
        .iter()
        .map(|_| Err(io::Error::new(e.kind(), e.to_string())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_and_traversal() {
        let p = mailbox_path("/var/mail/{domain}/{user}/Maildir", "example.org", "bob").unwrap();
        assert_eq!(p, PathBuf::from("/var/mail/example.org/bob/Maildir"));
        for bad in ["..", ".", "", "a/b", ".hidden", "x\0y"] {
            assert!(
                mailbox_path("/m/{domain}/{user}", "example.org", bad).is_err(),
                "{bad:?}"
            );
        }
        assert!(mailbox_path("/m/{domain}/{user}", "../etc", "bob").is_err());
    }

    #[tokio::test]
    async fn delivers_into_new_with_headers() {
        let dir = tempfile::tempdir().unwrap();
        let md = Maildir::new(Syncer::start().unwrap(), "mx.example.test");
        let targets = vec![
            Target {
                maildir: dir.path().join("a/Maildir"),
                delivered_to: "a@example.test".into(),
                key: None,
                look_in_cur: false,
                fresh: false,
            },
            Target {
                maildir: dir.path().join("b/Maildir"),
                delivered_to: "b@example.test".into(),
                key: None,
                look_in_cur: false,
                fresh: false,
            },
        ];
        let results = md
            .deliver(&targets, "alice@example.test", b"Subject: x\r\n\r\nhi\r\n")
            .await;
        for (r, t) in results.iter().zip(&targets) {
            let path = r.as_ref().unwrap();
            assert!(path.starts_with(t.maildir.join("new")));
            let data = fs::read(path).unwrap();
            let want = format!(
                "Return-Path: <alice@example.test>\r\nDelivered-To: {}\r\nSubject: x\r\n\r\nhi\r\n",
                t.delivered_to
            );
            assert_eq!(data, want.as_bytes());
            assert_eq!(fs::read_dir(t.maildir.join("tmp")).unwrap().count(), 0);
            assert!(t.maildir.join("cur").is_dir());
            let mode = std::os::unix::fs::MetadataExt::mode(&fs::metadata(path).unwrap()) & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[tokio::test]
    async fn failure_is_reported_per_target() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the Maildir folder should be: that target fails, the other succeeds.
        fs::write(dir.path().join("blocked"), b"").unwrap();
        let md = Maildir::new(Syncer::start().unwrap(), "mx");
        let targets = vec![
            Target {
                maildir: dir.path().join("blocked/Maildir"),
                delivered_to: "x@y".into(),
                key: None,
                look_in_cur: false,
                fresh: false,
            },
            Target {
                maildir: dir.path().join("ok/Maildir"),
                delivered_to: "z@y".into(),
                key: None,
                look_in_cur: false,
                fresh: false,
            },
        ];
        let r = md.deliver(&targets, "", b"x\r\n").await;
        assert!(r[0].is_err());
        assert!(r[1].is_ok());
    }

    /// A delivery repeated after a crash (the spool file outlived the Maildir delivery it led
    /// to) finds the first one by its name, in new/ or, for a recovered message, in cur/ where
    /// a reader moved it, and is not made twice; a stale tmp/ file of it is replaced.
    #[tokio::test]
    async fn a_repeated_delivery_is_not_made_twice() {
        let dir = tempfile::tempdir().unwrap();
        let md = Maildir::new(Syncer::start().unwrap(), "mx");
        let mut t = Target {
            maildir: dir.path().join("a/Maildir"),
            delivered_to: "a@y".into(),
            key: Some("E0123456789ABR0".into()),
            look_in_cur: false,
            fresh: false,
        };
        let first = md.deliver(std::slice::from_ref(&t), "", b"x\r\n").await;
        let first = first[0].as_ref().unwrap().clone();
        assert!(
            first.ends_with("new/E0123456789ABR0.mx"),
            "{}",
            first.display()
        );
        let again = md.deliver(std::slice::from_ref(&t), "", b"x\r\n").await;
        assert_eq!(again[0].as_ref().unwrap(), &first);
        assert_eq!(fs::read_dir(t.maildir.join("new")).unwrap().count(), 1);
        // A reader moved it to cur/ with flags.
        let cur = t.maildir.join("cur").join("E0123456789ABR0.mx:2,S");
        fs::rename(&first, &cur).unwrap();
        t.look_in_cur = true;
        let again = md.deliver(std::slice::from_ref(&t), "", b"x\r\n").await;
        assert_eq!(again[0].as_ref().unwrap(), &cur);
        assert_eq!(fs::read_dir(t.maildir.join("new")).unwrap().count(), 0);
        // Another recipient index is another delivery; a stale tmp/ file is replaced.
        t.key = Some("E0123456789ABR1".into());
        fs::write(t.maildir.join("tmp").join("E0123456789ABR1.mx"), b"half").unwrap();
        let other = md.deliver(std::slice::from_ref(&t), "", b"x\r\n").await;
        let other = other[0].as_ref().unwrap();
        assert!(other.ends_with("new/E0123456789ABR1.mx"));
        assert_eq!(
            fs::read(other).unwrap(),
            b"Return-Path: <>\r\nDelivered-To: a@y\r\nx\r\n"
        );
        assert_eq!(fs::read_dir(t.maildir.join("tmp")).unwrap().count(), 0);
    }

    /// A retry that finds a file of its name holding another message (a queue ID that came
    /// again after the clock was set back) does not take it for its own delivery: it delivers,
    /// under another name, and leaves that file alone.
    #[tokio::test]
    async fn a_file_of_the_same_name_from_another_message_is_not_taken() {
        let dir = tempfile::tempdir().unwrap();
        let md = Maildir::new(Syncer::start().unwrap(), "mx");
        let t = Target {
            maildir: dir.path().join("a/Maildir"),
            delivered_to: "a@y".into(),
            key: Some("E0123456789ABR0".into()),
            look_in_cur: false,
            fresh: false,
        };
        let old = md
            .deliver(
                std::slice::from_ref(&t),
                "",
                b"Received: old\r\n\r\nold\r\n",
            )
            .await;
        let old = old[0].as_ref().unwrap().clone();
        let new = md
            .deliver(
                std::slice::from_ref(&t),
                "",
                b"Received: new\r\n\r\nnew\r\n",
            )
            .await;
        let new = new[0].as_ref().unwrap().clone();
        assert_ne!(new, old);
        assert!(fs::read(&old).unwrap().ends_with(b"old\r\n"));
        assert!(fs::read(&new).unwrap().ends_with(b"new\r\n"));
        // The same message again is found, not written a second time.
        let again = md
            .deliver(
                std::slice::from_ref(&t),
                "",
                b"Received: old\r\n\r\nold\r\n",
            )
            .await;
        assert_eq!(again[0].as_ref().unwrap(), &old);
        assert_eq!(fs::read_dir(t.maildir.join("new")).unwrap().count(), 2);
    }

    /// A first attempt does not look for an earlier delivery, and never replaces a file that
    /// has its name (another message's, the clock having been set back): it takes another.
    #[tokio::test]
    async fn a_fresh_delivery_never_replaces_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let md = Maildir::new(Syncer::start().unwrap(), "mx");
        let t = Target {
            maildir: dir.path().join("a/Maildir"),
            delivered_to: "a@y".into(),
            key: Some("E0123456789ABR0".into()),
            look_in_cur: false,
            fresh: true,
        };
        let first = md.deliver(std::slice::from_ref(&t), "", b"one\r\n").await;
        let first = first[0].as_ref().unwrap().clone();
        assert!(first.ends_with("new/E0123456789ABR0.mx"));
        let second = md.deliver(std::slice::from_ref(&t), "", b"two\r\n").await;
        let second = second[0].as_ref().unwrap().clone();
        assert_ne!(second, first);
        assert!(second.starts_with(t.maildir.join("new")));
        assert!(fs::read(&first).unwrap().ends_with(b"one\r\n"));
        assert!(fs::read(&second).unwrap().ends_with(b"two\r\n"));
        assert_eq!(fs::read_dir(t.maildir.join("tmp")).unwrap().count(), 0);
    }
}
