//! A message's content on its way from the session to the spool, and large content read back
//! without holding it in memory.
//!
//! A small message is a `Vec<u8>`. A large one is written while it arrives to an unnamed file
//! in the spool directory ([`Spool::spill_file`](crate::spool::Spool::spill_file)); only its
//! header section is kept in memory, where the checks before the `250` edit it (our
//! Authentication-Results, a missing Date, a DKIM signature, a milter's header changes). The
//! checks that read the whole message (DKIM and ARC verification, signing, milters) read it
//! through a read-only mapping of that file: the page cache's memory, which the kernel can
//! reclaim, not the server's own.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

/// Above this many octets of content the session's bytes are written to a file as they
/// arrive (at this many at a time), and a queued message is mapped rather than read when it
/// is delivered.
pub const SPILL_AT: usize = 1024 * 1024;

/// How much is copied at a time between a spill file and the spool file.
pub(crate) const COPY_BLOCK: usize = 256 * 1024;

/// A message's content: in memory, or in a file with its header section in memory.
#[derive(Debug)]
pub enum MessageBody {
    /// The whole message.
    Memory(Vec<u8>),
    /// A large message.
    Spilled(Spilled),
}

impl From<Vec<u8>> for MessageBody {
    fn from(v: Vec<u8>) -> Self {
        MessageBody::Memory(v)
    }
}

/// Where a spill file's content starts: the space before it is left for the spool file's
/// header, so that the spill file becomes the spool file without its content being copied
/// ([`Spool::put_body`](crate::spool::Spool::put_body)).
pub const RESERVED: u64 = 64 * 1024;

/// A large message's content while it arrives: written to an unnamed file from [`RESERVED`]
/// on, its body's checksum computed on the way (the spool file's header names it).
#[derive(Debug)]
pub struct SpillWriter {
    file: File,
    /// Octets written so far.
    written: u64,
    /// The length of the header section (with its empty line), known from the first block.
    head_len: Option<u64>,
    /// The CRC-32 of the body (what follows the header section).
    body_crc: crc32fast::Hasher,
}

impl SpillWriter {
    /// Writes to `file` (an empty file of the spool's file system).
    pub fn new(file: File) -> SpillWriter {
        SpillWriter {
            file,
            written: 0,
            head_len: None,
            body_crc: crc32fast::Hasher::new(),
        }
    }

    /// Octets written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Appends the next block of the message (blocking). The first block holds the whole
    /// header section (the session hands nothing over before it is complete).
    pub fn write_block(&mut self, block: &[u8]) -> io::Result<()> {
        let body = match self.head_len {
            Some(_) => block,
            None => {
                // Where the session saw the header section end: at the first empty line,
                // CRLF or (in BDAT content) a bare LF.
                let end = head_end(block).unwrap_or(block.len());
                self.head_len = Some(end as u64);
                &block[end..]
            }
        };
        self.file.write_all_at(block, RESERVED + self.written)?;
        self.body_crc.update(body);
        self.written += block.len() as u64;
        Ok(())
    }

    /// The message once its last octets are written (blocking).
    pub fn finish(mut self, tail: &[u8]) -> io::Result<Spilled> {
        self.write_block(tail)?;
        let head_len = self.head_len.unwrap_or(0);
        let mut head = vec![0; head_len as usize];
        self.file.read_exact_at(&mut head, RESERVED)?;
        if head_end(&head) != Some(head.len()) {
            // The session refuses such a message (a header section over its limit).
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a large message without the empty line that ends its header section",
            ));
        }
        Ok(Spilled {
            head,
            received_head: head_len,
            file: self.file,
            len: RESERVED + self.written,
            body_crc: self.body_crc,
        })
    }
}

/// A large message: `head` (the header section and the empty line after it, as edited) then
/// the body, in its spill file from `RESERVED + received_head` to `len`.
#[derive(Debug)]
pub struct Spilled {
    head: Vec<u8>,
    /// The length of the header section as it arrived.
    received_head: u64,
    file: File,
    /// Where the file's content ends.
    len: u64,
    /// The CRC-32 of the body.
    body_crc: crc32fast::Hasher,
}

impl Spilled {
    /// The header section (with the empty line after it), which may be edited.
    pub fn head_mut(&mut self) -> &mut Vec<u8> {
        &mut self.head
    }

    /// The header section as it stands.
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// The header fields as they stand, without the empty line after them.
    pub fn fields(&self) -> &[u8] {
        &self.head[..self.head.len() - separator_len(&self.head)]
    }

    /// Where the body starts in the file.
    pub(crate) fn body_start(&self) -> u64 {
        RESERVED + self.received_head
    }

    /// Octets of the body.
    pub(crate) fn body_len(&self) -> u64 {
        self.len - self.body_start()
    }

    /// The CRC-32 of the body.
    pub(crate) fn body_crc(&self) -> &crc32fast::Hasher {
        &self.body_crc
    }

    /// The file (which becomes the spool file when it can).
    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Octets of the message as it stands.
    pub fn len(&self) -> u64 {
        self.head.len() as u64 + self.body_len()
    }

    /// True for a message of no octets (never, for a spilled one).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The message as it arrived, header section included (before any edit), mapped.
    pub fn map_received(&self) -> io::Result<Mapped> {
        Mapped::new(&self.file, RESERVED, self.len - RESERVED)
    }

    /// The body within a mapping of [`Spilled::map_received`].
    pub fn body_of<'a>(&self, map: &'a Mapped) -> &'a [u8] {
        &map[self.received_head as usize..]
    }

    /// The empty line that ends the header section, then the body, within a mapping of
    /// [`Spilled::map_received`].
    pub fn separator_and_body_of<'a>(&self, map: &'a Mapped) -> &'a [u8] {
        let head = &map[..self.received_head as usize];
        &map[head.len() - separator_len(head)..]
    }

    /// Calls `f` with the body in blocks of at most [`COPY_BLOCK`] octets, read from the file.
    pub(crate) fn for_each_body_block(
        &self,
        mut f: impl FnMut(&[u8]) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut buf = vec![0; COPY_BLOCK];
        let mut at = self.body_start();
        while at < self.len {
            let n = ((self.len - at) as usize).min(COPY_BLOCK);
            self.file.read_exact_at(&mut buf[..n], at)?;
            f(&buf[..n])?;
            at += n as u64;
        }
        Ok(())
    }
}

impl MessageBody {
    /// Octets of the message.
    pub fn len(&self) -> u64 {
        match self {
            MessageBody::Memory(v) => v.len() as u64,
            MessageBody::Spilled(s) => s.len(),
        }
    }

    /// True for an empty message.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The header section, for reading (the whole message when it is in memory).
    pub fn head(&self) -> &[u8] {
        match self {
            MessageBody::Memory(v) => v,
            MessageBody::Spilled(s) => s.head(),
        }
    }

    /// What header edits work on: the whole message in memory, or a large one's header
    /// section (an edit of the header section gives the same message either way).
    pub fn head_mut(&mut self) -> &mut Vec<u8> {
        match self {
            MessageBody::Memory(v) => v,
            MessageBody::Spilled(s) => s.head_mut(),
        }
    }

    /// Puts `fields` before the first header field.
    pub fn prepend(&mut self, fields: &[u8]) {
        self.head_mut().splice(0..0, fields.iter().copied());
    }
}

/// The index just after the empty line (CRLF or a bare LF, as the session reads it) that ends
/// the header section, if there is one.
pub(crate) fn head_end(message: &[u8]) -> Option<usize> {
    let stats = estafeta_proto::trace::header_stats(message);
    let rest = &message[stats.size..];
    if rest.starts_with(b"\r\n") {
        Some(stats.size + 2)
    } else if rest.starts_with(b"\n") {
        Some(stats.size + 1)
    } else {
        None
    }
}

/// The length of the empty line that ends `head` (a header section with it).
fn separator_len(head: &[u8]) -> usize {
    if head.ends_with(b"\r\n") && (head.len() == 2 || head.ends_with(b"\n\r\n")) {
        2
    } else if head.ends_with(b"\n") {
        1
    } else {
        0
    }
}

/// A read-only, private mapping of the start of a file: its octets without reading them into
/// the server's memory. Only for files that are not changed while mapped (a spill file, a
/// spool file: written once, then only read, and not emptied for reuse while large).
#[derive(Debug)]
pub struct Mapped {
    ptr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the mapping is read-only and owned; nothing else changes or unmaps it.
unsafe impl Send for Mapped {}
// SAFETY: as above: shared reads of immutable memory.
unsafe impl Sync for Mapped {}

impl Mapped {
    /// Maps `len` octets of `file` from `offset` (a multiple of the page size).
    pub fn new(file: &File, offset: u64, len: u64) -> io::Result<Mapped> {
        if len == 0 {
            return Ok(Mapped {
                ptr: std::ptr::null_mut(),
                len: 0,
            });
        }
        let len = usize::try_from(len).map_err(io::Error::other)?;
        // SAFETY: a new mapping chosen by the kernel, of an open file, read-only and private;
        // checked for MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                libc::off_t::try_from(offset).map_err(io::Error::other)?,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // Read once from start to end: the kernel reads ahead.
        // SAFETY: the range is the mapping just made.
        unsafe { libc::madvise(ptr, len, libc::MADV_SEQUENTIAL) };
        live().push((ptr as usize, len));
        Ok(Mapped { ptr, len })
    }
}

/// The live mappings (address, length): [`blocks`] releases pages only inside one of them.
fn live() -> std::sync::MutexGuard<'static, Vec<(usize, usize)>> {
    static LIVE: std::sync::Mutex<Vec<(usize, usize)>> = std::sync::Mutex::new(Vec::new());
    LIVE.lock().unwrap_or_else(|e| e.into_inner())
}

/// `content` in blocks of `size` octets, for a delivery that reads a message once from start
/// to end. When `content` is (part of) a mapped large message, each block's pages are let go
/// once the next block is asked for: the server's resident memory stays at about one block
/// whatever the message's size (the octets stay in the page cache; read again, they come back
/// from it). For content in memory, plain chunks.
pub fn blocks(content: &[u8], size: usize) -> Blocks<'_> {
    let start = content.as_ptr() as usize;
    let end = start + content.len();
    let mapped = content.len() > size && live().iter().any(|&(a, l)| a <= start && end <= a + l);
    Blocks {
        rest: content,
        size: size.max(1),
        prev: None,
        mapped,
    }
}

/// The iterator of [`blocks`].
#[derive(Debug)]
pub struct Blocks<'a> {
    rest: &'a [u8],
    size: usize,
    prev: Option<&'a [u8]>,
    mapped: bool,
}

impl<'a> Blocks<'a> {
    fn release_prev(&mut self) {
        let Some(p) = self.prev.take() else { return };
        if !self.mapped {
            return;
        }
        // SAFETY: sysconf has no preconditions.
        let page = (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as usize;
        let start = (p.as_ptr() as usize).div_ceil(page) * page;
        let end = (p.as_ptr() as usize + p.len()) / page * page;
        if end > start {
            // SAFETY: whole pages inside a live read-only private file mapping (checked at
            // creation, kept alive by the borrow of `content`): dropping them only means that
            // a later read faults them in again from the file, which never changes.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }
}

impl<'a> Iterator for Blocks<'a> {
    type Item = &'a [u8];
    fn next(&mut self) -> Option<&'a [u8]> {
        self.release_prev();
        if self.rest.is_empty() {
            return None;
        }
        let n = self.rest.len().min(self.size);
        let (block, rest) = self.rest.split_at(n);
        self.rest = rest;
        self.prev = Some(block);
        Some(block)
    }
}

impl Drop for Blocks<'_> {
    fn drop(&mut self) {
        self.release_prev();
    }
}

impl std::ops::Deref for Mapped {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: `ptr` is a live read-only mapping of `len` octets until drop, and the file
        // behind it is not truncated while it lives (see the type's documentation).
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, self.len) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        if self.len > 0 {
            live().retain(|&(a, _)| a != self.ptr as usize);
            // SAFETY: unmapping the mapping this value owns, once.
            unsafe { libc::munmap(self.ptr, self.len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn a_spilled_message_is_its_edited_head_then_its_body() {
        let msg = b"Subject: big\r\nFrom: a@b\r\n\r\nline one\r\nline two\r\n";
        let mut w = SpillWriter::new(tempfile::tempfile().unwrap());
        w.write_block(&msg[..30]).unwrap();
        let s = w.finish(&msg[30..]).unwrap();
        assert_eq!(s.head(), b"Subject: big\r\nFrom: a@b\r\n\r\n");
        let map = s.map_received().unwrap();
        assert_eq!(&map[..], &msg[..]);
        assert_eq!(s.body_of(&map), b"line one\r\nline two\r\n");
        assert_eq!(
            s.separator_and_body_of(&map),
            b"\r\nline one\r\nline two\r\n"
        );
        assert_eq!(
            s.body_crc().clone().finalize(),
            crc32fast::hash(b"line one\r\nline two\r\n")
        );
        let mut body = MessageBody::Spilled(s);
        body.prepend(b"X-Added: 1\r\n");
        assert_eq!(body.len(), msg.len() as u64 + 12);
        let MessageBody::Spilled(s) = body else {
            unreachable!()
        };
        let mut rest = Vec::new();
        s.for_each_body_block(|b| {
            rest.extend_from_slice(b);
            Ok(())
        })
        .unwrap();
        assert_eq!(rest, b"line one\r\nline two\r\n");
    }

    /// Read through [`blocks`], a mapped file's pages leave the process as it goes: its
    /// resident size does not grow by the file's.
    #[test]
    fn blocks_of_a_mapped_file_let_their_pages_go() {
        let mut f = tempfile::tempfile().unwrap();
        let block = vec![b'x'; 1 << 20];
        for _ in 0..64 {
            f.write_all(&block).unwrap();
        }
        let map = Mapped::new(&f, 0, 64 << 20).unwrap();
        let before = rss_file_kib();
        let mut sum = 0u64;
        for b in blocks(&map, 256 * 1024) {
            sum += b.iter().map(|&x| x as u64).sum::<u64>();
        }
        assert_eq!(sum, 64 * (1 << 20) * b'x' as u64);
        let grown = rss_file_kib().saturating_sub(before);
        assert!(grown < 8 * 1024, "resident file pages grew by {grown} KiB");
        // Whole, without blocks: the same reading keeps the pages (what blocks avoids).
        let all: u64 = map.iter().map(|&x| x as u64).sum();
        assert_eq!(all, sum);
        assert!(rss_file_kib().saturating_sub(before) > 32 * 1024);
        // Memory that is not a mapping is only cut in chunks.
        let v = vec![1u8; 10];
        assert_eq!(
            blocks(&v, 4).map(<[u8]>::len).collect::<Vec<_>>(),
            [4, 4, 2]
        );
    }

    fn rss_file_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("RssFile:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap()
    }

    /// BDAT content keeps bare line feeds: the header section ends where the session saw it
    /// end, at the first empty line of either kind, not at the first CRLF CRLF.
    #[test]
    fn a_bare_lf_empty_line_ends_the_header_section() {
        for (msg, head, rest) in [
            (
                &b"Subject: x\n\nbody\r\n\r\nmore\r\n"[..],
                &b"Subject: x\n\n"[..],
                &b"\nbody\r\n\r\nmore\r\n"[..],
            ),
            (
                b"Subject: x\n\r\nbody\r\n\r\nmore\r\n",
                b"Subject: x\n\r\n",
                b"\r\nbody\r\n\r\nmore\r\n",
            ),
        ] {
            let w = SpillWriter::new(tempfile::tempfile().unwrap());
            let s = w.finish(msg).unwrap();
            assert_eq!(s.head(), head);
            assert_eq!(s.fields(), b"Subject: x\n");
            let map = s.map_received().unwrap();
            assert_eq!(s.separator_and_body_of(&map), rest);
        }
        let w = SpillWriter::new(tempfile::tempfile().unwrap());
        assert!(w.finish(b"Subject: no end\r\n").is_err());
    }

    #[test]
    fn a_message_without_header_fields_is_all_body() {
        let w = SpillWriter::new(tempfile::tempfile().unwrap());
        let s = w.finish(b"\r\nbody only\r\n").unwrap();
        assert_eq!(s.head(), b"\r\n");
        assert_eq!(s.fields(), b"");
        assert_eq!(s.len(), 13);
    }
}
