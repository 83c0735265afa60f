//! Group commit: one thread makes files durable for many waiters with one `syncfs(2)` per
//! file system per round.
//!
//! A writer writes its file (no fsync), then asks the syncer to make it durable and waits. The
//! syncer takes every request that arrived, calls `syncfs` once on each file system they
//! concern, and answers them all; requests that arrive meanwhile form the next round. One
//! `syncfs` flushes file data, inodes and directory entries (renames included) of the whole
//! file system, so it stands for the fsync of each file plus the fsync of each directory, and
//! its cost is shared by every message in the round. syncfs reports write-back errors since
//! Linux 5.8.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use tokio::sync::oneshot;

struct Request {
    /// The file system, by device number.
    dev: u64,
    /// A directory on it, to open if the syncer has no handle for this device yet.
    dir: PathBuf,
    done: oneshot::Sender<io::Result<()>>,
}

/// A handle to the group-commit thread. Cheap to clone.
#[derive(Clone)]
pub struct Syncer {
    tx: mpsc::Sender<Request>,
}

impl std::fmt::Debug for Syncer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Syncer")
    }
}

impl Syncer {
    /// Starts the syncer thread. It stops when the last handle is dropped.
    pub fn start() -> io::Result<Syncer> {
        let (tx, rx) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("estafeta-sync".into())
            .spawn(move || run(rx))?;
        Ok(Syncer { tx })
    }

    /// Makes everything written so far on the file system holding `dir` durable.
    /// `dev` is that file system's device number (from the metadata of a file on it).
    pub async fn sync(&self, dev: u64, dir: &Path) -> io::Result<()> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Request {
                dev,
                dir: dir.to_path_buf(),
                done,
            })
            .map_err(|_| io::Error::other("syncer stopped"))?;
        wait.await.map_err(|_| io::Error::other("syncer stopped"))?
    }

    /// Like [`Syncer::sync`], finding the device of `dir` itself.
    pub async fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        let dev = std::fs::metadata(dir)?.dev();
        self.sync(dev, dir).await
    }
}

fn run(rx: mpsc::Receiver<Request>) {
    let mut handles: HashMap<u64, File> = HashMap::new();
    while let Ok(first) = rx.recv() {
        let mut round = vec![first];
        while let Ok(more) = rx.try_recv() {
            round.push(more);
        }
        let mut results: HashMap<u64, io::Result<()>> = HashMap::new();
        for req in &round {
            if results.contains_key(&req.dev) {
                continue;
            }
            let result = sync_fs(&mut handles, req.dev, &req.dir);
            results.insert(req.dev, result);
        }
        for req in round {
            let r = match &results[&req.dev] {
                Ok(()) => Ok(()),
                Err(e) => Err(io::Error::new(e.kind(), e.to_string())),
            };
            let _ = req.done.send(r);
        }
    }
}

fn sync_fs(handles: &mut HashMap<u64, File>, dev: u64, dir: &Path) -> io::Result<()> {
    if let std::collections::hash_map::Entry::Vacant(e) = handles.entry(dev) {
        e.insert(File::open(dir)?);
    }
    let f = &handles[&dev];
    // SAFETY: syncfs takes a valid open file descriptor, which `f` keeps open.
    let rc = unsafe { libc::syncfs(f.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        let err = io::Error::last_os_error();
        // Drop the handle so that a later round reopens it.
        handles.remove(&dev);
        Err(err)
    }
}
