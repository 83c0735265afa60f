//! The durable spool: one file per message, written before the client hears `250`.
//!
//! Layout under the spool directory (`<data_dir>/queue`):
//!
//! - `ID`: the message. A text header holding the envelope (one `key value` a line), an
//!   empty line, then the message as it will be delivered (our Received header first).
//!   Written to `ID.tmp`, renamed to `ID`, then made durable by the group-commit [`Syncer`];
//!   only then is the ID returned. The file never changes afterwards.
//! - `ID.st`: the recipients' delivery state once it differs from "all pending" (written to
//!   `ID.st.tmp`, renamed, synced before the scheduler acts on it).
//!
//! At start, `*.tmp` files are half-written and never acknowledged: they are removed. An `ID`
//! file is acknowledged only once its sync completed, so recovery checks it: its header names
//! the content's length and CRC-32 (`content LEN CRC`), and a file that is empty, cut short or
//! does not match was cut by a crash between its rename and its sync — never acknowledged. It is
//! moved to `queue/damaged/` (kept for the operator, never delivered) and logged. A file whose
//! sync fails is removed before the client hears `451`. A damaged `ID.st` is read as "every
//! recipient pending" (delivered at least once, never lost). Every other `ID` file is an
//! acknowledged message and is loaded with its state.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use estafeta_proto::address::{parse_forward_path, parse_reverse_path};
use estafeta_proto::command::{Body, MailParams, RcptParams, Ret};
use estafeta_proto::trace::received_header;
use estafeta_proto::{ClientInfo, Envelope, Recipient};

use crate::body::{COPY_BLOCK, Mapped, MessageBody, SPILL_AT, Spilled};
use crate::id::{IdGenerator, QueueId};
use crate::sync::Syncer;

const MAGIC: &str = "estafeta-queue 1";
const STATUS_MAGIC: &str = "estafeta-status 1";

/// Messages larger than this are written from the blocking pool rather than inline.
const INLINE_WRITE_LIMIT: usize = 256 * 1024;

/// The delivery state of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RcptState {
    /// Not delivered yet.
    Pending,
    /// Delivered (or relayed); never attempted again.
    Delivered,
    /// Failed for good; never attempted again.
    Failed,
}

/// A recipient's state, attempts and last error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RcptStatus {
    /// Where it stands.
    pub state: RcptState,
    /// Delivery attempts made so far.
    pub attempts: u32,
    /// The last error, for `queue list` and logs.
    pub last_error: Option<String>,
}

impl RcptStatus {
    /// Not attempted yet.
    pub fn pending() -> Self {
        RcptStatus {
            state: RcptState::Pending,
            attempts: 0,
            last_error: None,
        }
    }
}

/// A message in the spool: its envelope and the state of each recipient (not its content,
/// which [`Spool::read_content`] reads when it is needed).
#[derive(Debug, Clone)]
pub struct QueuedMessage {
    /// The queue ID.
    pub id: QueueId,
    /// When it was accepted (Unix seconds).
    pub arrival: u64,
    /// The envelope.
    pub envelope: Envelope,
    /// One status per `envelope.rcpts` entry, in the same order.
    pub status: Vec<RcptStatus>,
    /// The size of the message content in octets (with our Received header).
    pub size: u64,
    /// When the next attempt is due (Unix seconds); 0 means now.
    pub next_attempt: u64,
    /// True when an `ID.st` state file exists for this message.
    pub has_status_file: bool,
    /// True once a "delayed" notification was sent for this message.
    pub delay_warned: bool,
    /// True while the operator holds the message (`estafeta queue hold`): it is never
    /// attempted until released. Recorded in the state file, so it survives a restart.
    pub held: bool,
    /// The content, kept in memory from acceptance to the first attempt so that it is not
    /// read back from disk (None after that, or for large messages).
    pub content: Option<Content>,
    /// Loaded by recovery at start: a delivery may have happened before the crash without
    /// being recorded, so local delivery looks for it before repeating it.
    pub recovered: bool,
}

/// Message content shared without copying: the spool file's bytes and where the message
/// starts in them.
#[derive(Debug, Clone)]
pub struct Content {
    data: std::sync::Arc<Backing>,
    start: usize,
}

/// Where content's bytes are: read into memory, or (a large message) a mapping of its spool
/// file, which is never changed while the message is queued.
#[derive(Debug)]
enum Backing {
    Memory(Vec<u8>),
    Mapped(Mapped),
}

impl Content {
    /// The message as it is delivered (our Received header first).
    pub fn as_bytes(&self) -> &[u8] {
        match &*self.data {
            Backing::Memory(v) => &v[self.start..],
            Backing::Mapped(m) => &m[self.start..],
        }
    }

    /// Content held in a plain vector.
    pub fn from_vec(data: Vec<u8>) -> Content {
        Content {
            data: std::sync::Arc::new(Backing::Memory(data)),
            start: 0,
        }
    }
}

/// Messages up to this size stay in memory between acceptance and the first attempt.
const KEEP_IN_MEMORY: usize = 1024 * 1024;

impl QueuedMessage {
    /// The indices of the recipients still pending.
    pub fn pending(&self) -> Vec<usize> {
        self.status
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state == RcptState::Pending)
            .map(|(i, _)| i)
            .collect()
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A spool file that [`Spool::scan`] could not read: its name and the error.
pub type Unreadable = (String, io::Error);

/// The spool directory and its group-commit syncer.
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    ids: IdGenerator,
    syncer: Syncer,
    hostname: String,
    /// Emptied spool files kept in `free/` for reuse ([`FreeFiles`]).
    free: FreeFiles,
}

/// How many emptied spool files `free/` keeps for reuse.
const FREE_MAX: usize = 1024;

/// Spool files whose messages are done, emptied and kept in `free/` to be reused by the next
/// messages: the spool then creates and deletes no inode per message. Inode allocation
/// right after many deletions is what a busy spool pays most for on ext4 (without a journal,
/// ext4 skips every inode freed in the last seconds, reading their inode table blocks: 35 %
/// of the server's CPU when relaying at 1,200 msg/s on this machine, docs/performance.md).
/// A file in `free/` holds no message (it is truncated before it goes there); the directory
/// is read at start and kept; it never counts as queued.
#[derive(Debug, Default)]
struct FreeFiles {
    names: std::sync::Mutex<Vec<String>>,
    seq: std::sync::atomic::AtomicU64,
}

impl FreeFiles {
    fn take(&self) -> Option<String> {
        self.names.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// A name for a file to keep, or None when the pool is full.
    fn slot(&self) -> Option<String> {
        let len = self.names.lock().unwrap_or_else(|e| e.into_inner()).len();
        (len < FREE_MAX).then(|| {
            let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            format!("f{n}")
        })
    }

    fn give(&self, name: String) {
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name);
    }
}

impl Spool {
    /// Opens (creating it if needed, mode 0700) the spool directory `dir`.
    pub fn open(dir: &Path, hostname: &str, syncer: Syncer) -> io::Result<Spool> {
        fs::create_dir_all(dir)?;
        {
            use std::os::unix::fs::PermissionsExt;
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
        }
        let spool = Spool {
            dir: dir.to_path_buf(),
            ids: IdGenerator::new(),
            syncer,
            hostname: hostname.to_string(),
            free: FreeFiles::default(),
        };
        spool.load_free();
        Ok(spool)
    }

    /// Reads `free/` (creating it): its files are the pool, any beyond [`FREE_MAX`] removed.
    fn load_free(&self) {
        let dir = self.dir.join("free");
        let _ = fs::create_dir(&dir);
        let mut names: Vec<String> = fs::read_dir(&dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        for extra in names.split_off(names.len().min(FREE_MAX)) {
            let _ = fs::remove_file(dir.join(extra));
        }
        let next = names
            .iter()
            .filter_map(|n| n.strip_prefix('f')?.parse::<u64>().ok())
            .max()
            .map_or(0, |n| n + 1);
        self.free
            .seq
            .store(next, std::sync::atomic::Ordering::Relaxed);
        *self.free.names.lock().unwrap_or_else(|e| e.into_inner()) = names;
    }

    /// An emptied spool file to reuse (its path in `free/`), if the pool has one.
    fn reusable(&self) -> Option<PathBuf> {
        self.free.take().map(|n| self.dir.join("free").join(n))
    }

    /// Removes the spool file at `path`: emptied and kept in `free/` for reuse while the pool
    /// has room, unlinked otherwise.
    fn release(&self, path: &Path) -> io::Result<()> {
        // Moved out of the queue first, then emptied: a crash in between leaves a file in
        // `free/` with an old message, never an empty `ID` that recovery would report
        // damaged.
        // A large message's file may still be mapped by a delivery that is ending: it is never
        // emptied (that would pull the pages from under the mapping), only unlinked.
        let large = fs::metadata(path).map_or(true, |m| m.len() > SPILL_AT as u64);
        if !large && let Some(name) = self.free.slot() {
            let kept = self.dir.join("free").join(&name);
            if rename_noreplace(path, &kept).is_ok() {
                let emptied = OpenOptions::new()
                    .write(true)
                    .open(&kept)
                    .and_then(|f| f.set_len(0));
                match emptied {
                    Ok(()) => self.free.give(name),
                    Err(_) => {
                        let _ = fs::remove_file(&kept);
                    }
                }
                return Ok(());
            }
        }
        fs::remove_file(path)
    }

    /// Takes the spool's exclusive lock (`flock` on `.lock` in the spool directory): one
    /// writer at a time — the running server from before recovery until its last attempt has
    /// returned, or `estafeta queue` editing a stopped server's spool. Held until the returned
    /// file is dropped or the process ends (a `kill -9` releases it). `WouldBlock` when
    /// someone else holds it.
    pub fn lock(&self) -> io::Result<fs::File> {
        use std::os::unix::fs::OpenOptionsExt;
        use std::os::unix::io::AsRawFd;
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(self.dir.join(".lock"))?;
        // SAFETY: flock(2) on a descriptor we own.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let e = io::Error::last_os_error();
            return Err(if e.kind() == io::ErrorKind::WouldBlock {
                io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "the spool {} is in use by a running (or stopping) estafeta",
                        self.dir.display()
                    ),
                )
            } else {
                e
            });
        }
        Ok(file)
    }

    /// The spool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The group-commit syncer shared with the delivery agents.
    pub fn syncer(&self) -> &Syncer {
        &self.syncer
    }

    /// Makes a file written in the spool directory, and the directory's entries, durable.
    async fn sync_dir_of(&self, file: File) -> io::Result<()> {
        self.syncer.sync(vec![file], vec![self.dir.clone()]).await
    }

    fn path(&self, id: QueueId) -> PathBuf {
        self.dir.join(id.to_string())
    }

    fn status_path(&self, id: QueueId) -> PathBuf {
        self.dir.join(format!("{id}.st"))
    }

    /// Stores a message durably and returns it as queued. When this returns `Ok`, the message
    /// and its envelope are on stable storage (DESIGN.md decision 1).
    pub async fn put(&self, envelope: Envelope, body: Vec<u8>) -> io::Result<QueuedMessage> {
        let arrival = unix_now();
        let (id, buf, start, file) = if body.len() <= INLINE_WRITE_LIMIT {
            self.write_new(&envelope, &body, arrival)?
        } else {
            let env = envelope.clone();
            let dir = self.dir.clone();
            let hostname = self.hostname.clone();
            let id = self.ids.next();
            let reuse = self.reusable();
            tokio::task::spawn_blocking(move || {
                write_file(&dir, &hostname, id, &env, &body, arrival, reuse)
                    .map(|(b, s, f)| (id, b, s, f))
            })
            .await
            .map_err(io::Error::other)??
        };
        if let Err(e) = self.sync_dir_of(file).await {
            // Never acknowledged: it must not be delivered at the next start while the client,
            // told 451, sends it again.
            let _ = fs::remove_file(self.path(id));
            return Err(e);
        }
        let status = vec![RcptStatus::pending(); envelope.rcpts.len()];
        let size = (buf.len() - start) as u64;
        let content = (buf.len() <= KEEP_IN_MEMORY).then(|| Content {
            data: std::sync::Arc::new(Backing::Memory(buf)),
            start,
        });
        Ok(QueuedMessage {
            id,
            arrival,
            envelope,
            status,
            size,
            next_attempt: 0,
            has_status_file: false,
            delay_warned: false,
            held: false,
            content,
            recovered: false,
        })
    }

    /// Stores a message durably and held (a milter's quarantine). The held mark (`ID.st`) is
    /// durable before the message file exists: a crash can leave a mark without its message
    /// (ignored at start), never a message without its mark, which would be delivered
    /// unfiltered while the client, never told 250, sends it again.
    pub async fn put_held(
        &self,
        envelope: Envelope,
        body: impl Into<MessageBody>,
    ) -> io::Result<QueuedMessage> {
        let body = body.into();
        let arrival = unix_now();
        let id = self.ids.next();
        let mut msg = QueuedMessage {
            id,
            arrival,
            status: vec![RcptStatus::pending(); envelope.rcpts.len()],
            envelope,
            size: 0,
            next_attempt: 0,
            has_status_file: false,
            delay_warned: false,
            held: true,
            content: None,
            recovered: false,
        };
        self.write_status(&mut msg).await?;
        let env = msg.envelope.clone();
        let dir = self.dir.clone();
        let hostname = self.hostname.clone();
        let reuse = matches!(body, MessageBody::Memory(_))
            .then(|| self.reusable())
            .flatten();
        let written = tokio::task::spawn_blocking(move || match &body {
            MessageBody::Memory(v) => write_file(&dir, &hostname, id, &env, v, arrival, reuse)
                .map(|(buf, start, f)| ((buf.len() - start) as u64, f)),
            MessageBody::Spilled(s) => store_spilled(&dir, &hostname, id, &env, s, arrival),
        })
        .await
        .map_err(io::Error::other)
        .and_then(|r| r);
        let synced = match written {
            Ok((size, file)) => self.sync_dir_of(file).await.map(|()| size),
            Err(e) => Err(e),
        };
        match synced {
            Ok(size) => {
                msg.size = size;
                Ok(msg)
            }
            Err(e) => {
                let _ = fs::remove_file(self.path(id));
                let _ = fs::remove_file(self.status_path(id));
                Err(e)
            }
        }
    }

    /// A new queue ID and the content a message is delivered with (our Received header first),
    /// for a delivery made before the message is acknowledged ([`QueueHandle::submit`] when
    /// the transport can deliver every recipient at once): nothing is written here.
    ///
    /// [`QueueHandle::submit`]: crate::QueueHandle::submit
    pub fn prepare(&self, envelope: &Envelope, body: &[u8]) -> (QueueId, u64, Content) {
        let arrival = unix_now();
        let id = self.ids.next();
        let received = received_header(&self.hostname, envelope, &id.to_string(), arrival);
        let mut data = Vec::with_capacity(received.len() + body.len());
        data.extend_from_slice(received.as_bytes());
        data.extend_from_slice(body);
        (id, arrival, Content::from_vec(data))
    }

    /// Stores durably a message [`Spool::prepare`]d and partly delivered already: `status`
    /// says which recipients are done. When this returns `Ok`, the message and that state are
    /// on stable storage.
    pub async fn put_prepared(
        &self,
        id: QueueId,
        arrival: u64,
        envelope: Envelope,
        content: Content,
        status: Vec<RcptStatus>,
    ) -> io::Result<QueuedMessage> {
        let (_, _, file) = write_parts(
            &self.dir,
            id,
            &envelope,
            &[content.as_bytes()],
            arrival,
            self.reusable(),
        )?;
        if let Err(e) = self.sync_dir_of(file).await {
            let _ = fs::remove_file(self.path(id));
            return Err(e);
        }
        let mut msg = QueuedMessage {
            id,
            arrival,
            envelope,
            size: content.as_bytes().len() as u64,
            status,
            next_attempt: 0,
            has_status_file: false,
            delay_warned: false,
            held: false,
            content: Some(content),
            recovered: false,
        };
        if msg.status.iter().any(|s| s.state != RcptState::Pending)
            && let Err(e) = self.write_status(&mut msg).await
        {
            // Without its state the file would deliver the done recipients again: it is
            // taken back, and the client, told 451, sends the message again.
            let _ = self.remove(&msg);
            return Err(e);
        }
        Ok(msg)
    }

    fn write_new(
        &self,
        env: &Envelope,
        body: &[u8],
        arrival: u64,
    ) -> io::Result<(QueueId, Vec<u8>, usize, File)> {
        loop {
            let id = self.ids.next();
            match write_file(
                &self.dir,
                &self.hostname,
                id,
                env,
                body,
                arrival,
                self.reusable(),
            ) {
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                r => return r.map(|(b, s, f)| (id, b, s, f)),
            }
        }
    }

    /// Reads the message content (what is delivered) of `id`: a large message is mapped, not
    /// read into memory (its spool file never changes while it is queued).
    pub fn read_content(&self, id: QueueId) -> io::Result<Content> {
        let mut file = File::open(self.path(id))?;
        let len = file.metadata()?.len();
        let data = if len > SPILL_AT as u64 {
            Backing::Mapped(Mapped::new(&file, 0, len)?)
        } else {
            let mut data = Vec::new();
            file.read_to_end(&mut data)?;
            Backing::Memory(data)
        };
        let bytes = match &data {
            Backing::Memory(v) => &v[..],
            Backing::Mapped(m) => &m[..],
        };
        let start = header_end(bytes).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidData, "queue file has no header end")
        })?;
        Ok(Content {
            data: std::sync::Arc::new(data),
            start,
        })
    }

    /// An unnamed file in the spool directory for a large message's content while it arrives
    /// (`O_TMPFILE`: it vanishes with its last descriptor, a crash included).
    pub fn spill_file(&self) -> io::Result<File> {
        use std::os::unix::fs::OpenOptionsExt;
        match OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .mode(0o600)
            .open(&self.dir)
        {
            Ok(f) => Ok(f),
            // A file system without O_TMPFILE: a named file, unlinked at once.
            Err(_) => {
                let path = self.dir.join(format!("spill-{}.tmp", self.ids.next()));
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path)?;
                fs::remove_file(&path)?;
                Ok(f)
            }
        }
    }

    /// [`Spool::put`] for content in memory or written to a file while it arrived.
    pub async fn put_body(
        &self,
        envelope: Envelope,
        body: MessageBody,
    ) -> io::Result<QueuedMessage> {
        let spilled = match body {
            MessageBody::Memory(v) => return self.put(envelope, v).await,
            MessageBody::Spilled(s) => s,
        };
        let arrival = unix_now();
        let env = envelope.clone();
        let dir = self.dir.clone();
        let hostname = self.hostname.clone();
        let id = self.ids.next();
        let (size, file) = tokio::task::spawn_blocking(move || {
            store_spilled(&dir, &hostname, id, &env, &spilled, arrival)
        })
        .await
        .map_err(io::Error::other)??;
        if let Err(e) = self.sync_dir_of(file).await {
            let _ = fs::remove_file(self.path(id));
            return Err(e);
        }
        Ok(QueuedMessage {
            id,
            arrival,
            status: vec![RcptStatus::pending(); envelope.rcpts.len()],
            envelope,
            size,
            next_attempt: 0,
            has_status_file: false,
            delay_warned: false,
            held: false,
            content: None,
            recovered: false,
        })
    }

    /// Loads one message with its state.
    pub fn load(&self, id: QueueId) -> io::Result<QueuedMessage> {
        let file = File::open(self.path(id))?;
        let total = file.metadata()?.len();
        let mut reader = BufReader::new(file);
        let (mut msg, header_len) = parse_header(&mut reader, id)?;
        msg.size = total.saturating_sub(header_len);
        match fs::read(self.status_path(id)) {
            Ok(bytes) => {
                let text = String::from_utf8_lossy(&bytes);
                if let Err(e) = apply_status(&mut msg, &text) {
                    // Cut by a crash between its rename and its sync: what it said is lost, so
                    // every recipient is pending again (at least once, never lost).
                    tracing::warn!(id = %id, error = %e, "damaged queue status file: every recipient is pending again");
                    msg.status = vec![RcptStatus::pending(); msg.envelope.rcpts.len()];
                    msg.next_attempt = 0;
                    msg.delay_warned = false;
                    msg.held = false;
                }
                msg.has_status_file = true;
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        Ok(msg)
    }

    /// Opens an existing spool directory without creating or changing anything (for
    /// `estafeta queue …` reading the spool of a server that may be stopped).
    pub fn open_existing(dir: &Path, hostname: &str, syncer: Syncer) -> io::Result<Spool> {
        if !fs::metadata(dir)?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::NotADirectory,
                format!("{} is not a directory", dir.display()),
            ));
        }
        Ok(Spool {
            dir: dir.to_path_buf(),
            ids: IdGenerator::new(),
            syncer,
            hostname: hostname.to_string(),
            // Not read: this handle changes nothing it does not have to (a message it
            // removes is unlinked, or kept under a name `free/` does not have yet).
            free: FreeFiles::default(),
        })
    }

    /// Every message in the spool with its state, sorted by ID, for listing. Unlike
    /// [`Spool::recover`] it changes nothing: half-written files are skipped, not removed.
    /// Files that cannot be read are returned beside, with their error.
    pub fn scan(&self) -> io::Result<(Vec<QueuedMessage>, Vec<Unreadable>)> {
        let mut out = Vec::new();
        let mut broken = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(id) = name.to_str().and_then(QueueId::parse) else {
                continue;
            };
            match self.load(id) {
                Ok(m) => out.push(m),
                // Removed between the listing and the read: delivered meanwhile.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => broken.push((id.to_string(), e)),
            }
        }
        out.sort_by_key(|m| m.id);
        Ok((out, broken))
    }

    /// The header section of the message `id` as stored (our Received header first), up to
    /// and without the empty line that ends it.
    pub fn read_headers(&self, id: QueueId) -> io::Result<Vec<u8>> {
        let content = self.read_content(id)?;
        let bytes = content.as_bytes();
        let end = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .map(|i| i + 2)
            .unwrap_or(bytes.len());
        Ok(bytes[..end].to_vec())
    }

    /// Scans the spool at start: removes half-written files, returns every acknowledged
    /// message. Files that cannot be read are reported and left in place for the operator.
    pub fn recover(&self) -> io::Result<Vec<QueuedMessage>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(".tmp") {
                tracing::info!(file = name, "removing half-written queue file");
                let _ = fs::remove_file(entry.path());
                continue;
            }
            let Some(id) = QueueId::parse(name) else {
                continue;
            };
            self.ids.advance_past(id);
            match self.check(id).and_then(|()| self.load(id)) {
                Ok(mut m) => {
                    m.recovered = true;
                    out.push(m);
                }
                Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                    // Empty, cut short or not matching its checksum: written, renamed, but
                    // its sync never completed, so never acknowledged.
                    match self.set_aside(id) {
                        Ok(to) => {
                            tracing::error!(id = %id, error = %e, moved_to = %to.display(), "damaged queue file (never acknowledged: cut by a crash before its sync); set aside, not delivered")
                        }
                        Err(m) => {
                            tracing::error!(id = %id, error = %e, move_error = %m, "damaged queue file; cannot set it aside; left in place")
                        }
                    }
                }
                Err(e) => {
                    tracing::error!(id = %id, error = %e, "cannot read queue file; left in place")
                }
            }
        }
        out.sort_by_key(|m| m.id);
        Ok(out)
    }

    /// Checks that the file of `id` is whole: its content has the length and CRC-32 its header
    /// names. `InvalidData` when it does not (or has no header end); files written before the
    /// checksum existed pass.
    pub fn check(&self, id: QueueId) -> io::Result<()> {
        let mut file = File::open(self.path(id))?;
        let len = file.metadata()?.len();
        if len > SPILL_AT as u64 {
            // A large message: mapped and read in blocks, not read into memory.
            return check_content(&Mapped::new(&file, 0, len)?);
        }
        let mut data = Vec::new();
        file.read_to_end(&mut data)?;
        check_content(&data)
    }

    /// Moves a damaged file (and its state) to `queue/damaged/`; returns where it went.
    fn set_aside(&self, id: QueueId) -> io::Result<PathBuf> {
        let dir = self.dir.join("damaged");
        fs::create_dir_all(&dir)?;
        let to = dir.join(id.to_string());
        fs::rename(self.path(id), &to)?;
        let _ = fs::rename(self.status_path(id), dir.join(format!("{id}.st")));
        Ok(to)
    }

    /// Records the recipients' state durably (before the scheduler acts on it).
    pub async fn write_status(&self, msg: &mut QueuedMessage) -> io::Result<()> {
        let mut text = String::new();
        text.push_str(STATUS_MAGIC);
        text.push('\n');
        text.push_str(&format!("next {}\n", msg.next_attempt));
        if msg.delay_warned {
            text.push_str("warned\n");
        }
        if msg.held {
            text.push_str("held\n");
        }
        for (i, s) in msg.status.iter().enumerate() {
            let state = match s.state {
                RcptState::Pending => "pending",
                RcptState::Delivered => "delivered",
                RcptState::Failed => "failed",
            };
            let err = s
                .last_error
                .as_deref()
                .unwrap_or("")
                .replace(['\r', '\n'], " ");
            text.push_str(&format!("rcpt {i} {state} {} {err}\n", s.attempts));
        }
        let tmp = self.dir.join(format!("{}.st.tmp", msg.id));
        let mut f = File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        fs::rename(&tmp, self.status_path(msg.id))?;
        msg.has_status_file = true;
        self.sync_dir_of(f).await
    }

    /// Removes a message whose recipients are all done. Not synced: should the removal be
    /// lost in a crash, the message is delivered again (at least once, never lost).
    pub fn remove(&self, msg: &QueuedMessage) -> io::Result<()> {
        if msg.has_status_file {
            match fs::remove_file(self.status_path(msg.id)) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        self.release(&self.path(msg.id))
    }
}

/// Reads a whole spool file and its state file as recovery does, without touching the disk:
/// the message, or why the file is not one (`InvalidData`: damaged, never acknowledged). For
/// fuzzing and tests: recovery must never panic, whatever the bytes.
pub fn parse_files(id: QueueId, data: &[u8], status: Option<&[u8]>) -> io::Result<QueuedMessage> {
    check_content(data)?;
    let mut reader = std::io::Cursor::new(data);
    let (mut msg, header_len) = parse_header(&mut reader, id)?;
    msg.size = (data.len() as u64).saturating_sub(header_len);
    if let Some(bytes) = status {
        if apply_status(&mut msg, &String::from_utf8_lossy(bytes)).is_err() {
            msg.status = vec![RcptStatus::pending(); msg.envelope.rcpts.len()];
        }
        msg.has_status_file = true;
    }
    Ok(msg)
}

/// Whether `data` (a whole spool file) holds the content its `content LEN CRC` header line
/// names.
fn check_content(data: &[u8]) -> io::Result<()> {
    let start = header_end(data).ok_or_else(|| bad("empty or cut short (no end of header)"))?;
    let header = String::from_utf8_lossy(&data[..start]);
    let Some(line) = header.lines().find_map(|l| l.strip_prefix("content ")) else {
        // Written before the checksum existed.
        return Ok(());
    };
    let (len, crc) = line.split_once(' ').ok_or_else(|| bad("content line"))?;
    let len: usize = len.parse().map_err(|_| bad("content length"))?;
    let crc = u32::from_str_radix(crc.trim(), 16).map_err(|_| bad("content checksum"))?;
    let content = &data[start..];
    if content.len() != len {
        return Err(bad(&format!(
            "cut short: {} of {len} octets of content",
            content.len()
        )));
    }
    let mut hasher = crc32fast::Hasher::new();
    for b in crate::body::blocks(content, COPY_BLOCK) {
        hasher.update(b);
    }
    if hasher.finalize() != crc {
        return Err(bad("content does not match its checksum"));
    }
    Ok(())
}

/// The offset of the message content: just after the first empty line.
fn header_end(data: &[u8]) -> Option<usize> {
    memchr::memmem::find(data, b"\n\n").map(|i| i + 2)
}

/// Makes a large message's spill file its spool file, without copying its content: the
/// header (envelope, `content LEN CRC`, a `pad` line of the length that makes it fit), our
/// Received field and the edited header section are written into the space left before the
/// body ([`RESERVED`](crate::body::RESERVED)), then the file is linked into the spool
/// directory. `None` when that cannot be done (the header does not fit, or the file cannot be
/// linked): the caller copies instead.
fn link_spilled(
    dir: &Path,
    hostname: &str,
    id: QueueId,
    env: &Envelope,
    body: &Spilled,
    arrival: u64,
) -> io::Result<Option<(u64, File)>> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileExt;
    use std::os::unix::io::AsRawFd;
    let received = received_header(hostname, env, &id.to_string(), arrival);
    let len = received.len() as u64 + body.len();
    let mut crc = crc32fast::Hasher::new();
    crc.update(received.as_bytes());
    crc.update(body.head());
    crc.combine(body.body_crc());
    let mut prefix = serialize_envelope(env, id, arrival);
    prefix.push_str(&format!("content {len} {:08x}\n", crc.finalize()));
    let fixed = prefix.len() + "pad \n\n".len() + received.len() + body.head().len();
    let Some(pad) = (body.body_start() as usize).checked_sub(fixed) else {
        return Ok(None);
    };
    prefix.push_str("pad ");
    prefix.extend(std::iter::repeat_n('-', pad));
    prefix.push_str("\n\n");
    prefix.push_str(&received);
    let mut bytes = prefix.into_bytes();
    bytes.extend_from_slice(body.head());
    debug_assert_eq!(bytes.len() as u64, body.body_start());
    let file = body.file();
    file.write_all_at(&bytes, 0)?;
    // An O_TMPFILE file gets its name through /proc (linkat with AT_EMPTY_PATH needs a
    // privilege); a file that cannot be linked is copied.
    let tmp = dir.join(format!("{id}.tmp"));
    let source = std::ffi::CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .map_err(io::Error::other)?;
    let target = std::ffi::CString::new(tmp.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            source.as_ptr(),
            libc::AT_FDCWD,
            target.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if rc != 0 {
        return Ok(None);
    }
    if let Err(e) = rename_noreplace(&tmp, &dir.join(id.to_string())) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(Some((len, file.try_clone()?)))
}

/// A large message into the spool: its spill file linked when it can be
/// ([`link_spilled`]), copied otherwise ([`write_spilled`], into a new file: a file of the
/// reuse pool would stay taken when the link works).
fn store_spilled(
    dir: &Path,
    hostname: &str,
    id: QueueId,
    env: &Envelope,
    body: &Spilled,
    arrival: u64,
) -> io::Result<(u64, File)> {
    match link_spilled(dir, hostname, id, env, body, arrival)? {
        Some(done) => Ok(done),
        None => write_spilled(dir, hostname, id, env, body, arrival, None),
    }
}

/// [`write_file`] for a large message: the content is copied from its spill file in blocks,
/// its checksum computed on the way and written into the header last (fixed width).
fn write_spilled(
    dir: &Path,
    hostname: &str,
    id: QueueId,
    env: &Envelope,
    body: &Spilled,
    arrival: u64,
    reuse: Option<PathBuf>,
) -> io::Result<(u64, File)> {
    use std::os::unix::fs::FileExt;
    let final_path = dir.join(id.to_string());
    let tmp = dir.join(format!("{id}.tmp"));
    let received = received_header(hostname, env, &id.to_string(), arrival);
    let len = received.len() as u64 + body.len();
    let mut header = serialize_envelope(env, id, arrival);
    header.push_str(&format!("content {len} "));
    let crc_at = header.len() as u64;
    header.push_str("00000000\n\n");
    let f = open_new(&tmp, reuse)?;
    let result = (|| {
        let mut crc = crc32fast::Hasher::new();
        let mut w = io::BufWriter::with_capacity(COPY_BLOCK, &f);
        w.write_all(header.as_bytes())?;
        for part in [received.as_bytes(), body.head()] {
            crc.update(part);
            w.write_all(part)?;
        }
        body.for_each_body_block(|b| {
            crc.update(b);
            w.write_all(b)
        })?;
        w.flush()?;
        drop(w);
        f.write_all_at(format!("{:08x}", crc.finalize()).as_bytes(), crc_at)?;
        rename_noreplace(&tmp, &final_path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| (len, f))
}

/// Writes `ID.tmp` and renames it to `ID` without replacing an existing file. Returns the
/// bytes written, where the message content starts in them, and the open file (to be synced).
fn write_file(
    dir: &Path,
    hostname: &str,
    id: QueueId,
    env: &Envelope,
    body: &[u8],
    arrival: u64,
    reuse: Option<PathBuf>,
) -> io::Result<(Vec<u8>, usize, File)> {
    let received = received_header(hostname, env, &id.to_string(), arrival);
    write_parts(dir, id, env, &[received.as_bytes(), body], arrival, reuse)
}

/// Writes the spool file of `id` whose content is the concatenation of `parts`; returns the
/// file's bytes, where the content starts in them, and the open file (for the syncer).
fn write_parts(
    dir: &Path,
    id: QueueId,
    env: &Envelope,
    parts: &[&[u8]],
    arrival: u64,
    reuse: Option<PathBuf>,
) -> io::Result<(Vec<u8>, usize, File)> {
    let final_path = dir.join(id.to_string());
    let tmp = dir.join(format!("{id}.tmp"));
    let mut header = serialize_envelope(env, id, arrival);
    // The content's length and checksum: recovery tells a whole file from one a crash cut.
    let mut crc = crc32fast::Hasher::new();
    let mut len = 0;
    for part in parts {
        crc.update(part);
        len += part.len();
    }
    header.push_str(&format!("content {len} {:08x}\n", crc.finalize()));
    header.push('\n');
    let mut buf = Vec::with_capacity(header.len() + len);
    buf.extend_from_slice(header.as_bytes());
    for part in parts {
        buf.extend_from_slice(part);
    }
    let mut f = open_new(&tmp, reuse)?;
    let result = f
        .write_all(&buf)
        .and_then(|()| rename_noreplace(&tmp, &final_path));
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map(|()| (buf, header.len(), f))
}

/// Creates `tmp` (which must not exist) for writing: the emptied spool file `reuse` renamed
/// there when one is given and that works, a new file otherwise.
fn open_new(tmp: &Path, reuse: Option<PathBuf>) -> io::Result<File> {
    if let Some(old) = reuse
        && rename_noreplace(&old, tmp).is_ok()
    {
        match OpenOptions::new().write(true).truncate(true).open(tmp) {
            Ok(f) => return Ok(f),
            Err(_) => {
                let _ = fs::remove_file(tmp);
            }
        }
    }
    OpenOptions::new().write(true).create_new(true).open(tmp)
}

/// `rename(2)` that fails with `AlreadyExists` instead of replacing `to` (renameat2
/// RENAME_NOREPLACE; a check then a rename where the file system lacks it).
pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let f = CString::new(from.as_os_str().as_bytes()).map_err(io::Error::other)?;
    let t = CString::new(to.as_os_str().as_bytes()).map_err(io::Error::other)?;
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            f.as_ptr(),
            libc::AT_FDCWD,
            t.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            if fs::symlink_metadata(to).is_ok() {
                return Err(io::ErrorKind::AlreadyExists.into());
            }
            fs::rename(from, to)
        }
        _ => Err(err),
    }
}

/// The envelope as `key value` lines (no line holds CR or LF: the parser refused them).
fn serialize_envelope(env: &Envelope, id: QueueId, arrival: u64) -> String {
    let mut s = String::with_capacity(256);
    let mut line = |k: &str, v: &str| {
        s.push_str(k);
        if !v.is_empty() {
            s.push(' ');
            s.push_str(v);
        }
        s.push('\n');
    };
    line(MAGIC, "");
    line("id", &id.to_string());
    line("arrival", &arrival.to_string());
    line("client-ip", &env.client.ip.to_string());
    line("client-port", &env.client.port.to_string());
    line("helo", &env.client.helo);
    line("protocol", &env.client.protocol);
    if let Some(tls) = &env.client.tls {
        line("tls", tls);
    }
    if let Some(user) = &env.client.auth {
        line("auth", user);
    }
    if let Some(uid) = env.client.local_uid {
        line("local-uid", &uid.to_string());
    }
    if let Some(name) = &env.client.name {
        line("client-name", name);
    }
    line("from", &format!("<{}>", env.from));
    if let Some(size) = env.params.size {
        line("size", &size.to_string());
    }
    if let Some(body) = env.params.body {
        line("body", body.as_str());
    }
    if env.params.smtputf8 {
        line("smtputf8", "");
    }
    if let Some(ret) = env.params.ret {
        line("ret", ret.as_str());
    }
    if let Some(envid) = &env.params.envid {
        line("envid", envid);
    }
    if env.params.requiretls {
        line("requiretls", "");
    }
    for r in &env.rcpts {
        line("rcpt", &format!("<{}>{}", r.path, r.params));
    }
    s
}

fn bad(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("queue file: {what}"))
}

fn parse_header(reader: &mut impl BufRead, id: QueueId) -> io::Result<(QueuedMessage, u64)> {
    let mut consumed = 0u64;
    let mut line = String::new();
    let mut first = true;
    let mut arrival = 0;
    let mut client = ClientInfo {
        ip: IpAddr::from([0, 0, 0, 0]),
        port: 0,
        helo: String::new(),
        protocol: String::new(),
        tls: None,
        auth: None,
        local_uid: None,
        name: None,
    };
    let mut from = None;
    let mut params = MailParams::default();
    let mut rcpts = Vec::new();
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 {
            return Err(bad("truncated header"));
        }
        consumed += n as u64;
        let l = line.trim_end_matches('\n');
        if first {
            if l != MAGIC {
                return Err(bad("unknown format"));
            }
            first = false;
            continue;
        }
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(' ').unwrap_or((l, ""));
        match k {
            "id" => {}
            "arrival" => arrival = v.parse().map_err(|_| bad("arrival"))?,
            "client-ip" => client.ip = v.parse().map_err(|_| bad("client-ip"))?,
            "client-port" => client.port = v.parse().map_err(|_| bad("client-port"))?,
            "helo" => client.helo = v.to_string(),
            "protocol" => client.protocol = v.to_string(),
            "tls" => client.tls = Some(v.to_string()),
            "auth" => client.auth = Some(v.to_string()),
            "local-uid" => client.local_uid = Some(v.parse().map_err(|_| bad("local-uid"))?),
            "client-name" => client.name = Some(v.to_string()),
            "from" => from = Some(parse_reverse_path(v).map_err(|_| bad("from"))?.0),
            "size" => params.size = v.parse().ok(),
            "body" => {
                params.body = match v {
                    "7BIT" => Some(Body::SevenBit),
                    "8BITMIME" => Some(Body::EightBitMime),
                    "BINARYMIME" => Some(Body::BinaryMime),
                    _ => None,
                }
            }
            "smtputf8" => params.smtputf8 = true,
            "ret" => {
                params.ret = if v == "FULL" {
                    Some(Ret::Full)
                } else {
                    Some(Ret::Hdrs)
                }
            }
            "envid" => params.envid = Some(v.to_string()),
            "requiretls" => params.requiretls = true,
            "rcpt" => {
                let (path, rest) = parse_forward_path(v).map_err(|_| bad("rcpt"))?;
                // The RCPT TO parser's reading of what it accepted and the spool wrote. An
                // acknowledged recipient is never dropped over its parameters: ones it cannot
                // read (never written by this server) are left out, and said.
                let params = rest.parse::<RcptParams>().unwrap_or_else(|e| {
                    tracing::warn!(id = %id, rcpt = %path, error = %e.reply, "queue file: recipient parameters not understood; delivered without them");
                    RcptParams::default()
                });
                rcpts.push(Recipient { path, params });
            }
            _ => {} // written by a newer version: ignored
        }
    }
    let from = from.ok_or_else(|| bad("no sender"))?;
    let status = vec![RcptStatus::pending(); rcpts.len()];
    Ok((
        QueuedMessage {
            id,
            arrival,
            envelope: Envelope {
                client,
                from,
                params,
                rcpts,
            },
            status,
            size: 0,
            next_attempt: 0,
            has_status_file: false,
            delay_warned: false,
            held: false,
            content: None,
            recovered: false,
        },
        consumed,
    ))
}

fn apply_status(msg: &mut QueuedMessage, text: &str) -> io::Result<()> {
    let mut lines = text.lines();
    if lines.next() != Some(STATUS_MAGIC) {
        return Err(bad("unknown status format"));
    }
    for l in lines {
        let mut parts = l.splitn(5, ' ');
        match parts.next() {
            Some("next") => {
                msg.next_attempt = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            }
            Some("warned") => msg.delay_warned = true,
            Some("held") => msg.held = true,
            Some("rcpt") => {
                let i: usize = parts
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| bad("status index"))?;
                let state = match parts.next() {
                    Some("pending") => RcptState::Pending,
                    Some("delivered") => RcptState::Delivered,
                    Some("failed") => RcptState::Failed,
                    _ => return Err(bad("status state")),
                };
                let attempts = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
                let err = parts.next().unwrap_or("").trim();
                if let Some(s) = msg.status.get_mut(i) {
                    *s = RcptStatus {
                        state,
                        attempts,
                        last_error: (!err.is_empty()).then(|| err.to_string()),
                    };
                }
            }
            _ => {}
        }
    }
    Ok(())
}
