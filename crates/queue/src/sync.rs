//! Group commit: one thread makes files durable for many waiters at once.
//!
//! A writer writes its file (no fsync), then hands the open file and the directories whose
//! entries it changed to the syncer and waits. The syncer takes every request that arrived,
//! calls `syncfs(2)` once for each file system they are on, and answers them all; requests that
//! arrive meanwhile form the next round. One `syncfs` writes back every dirty file and inode of
//! the file system, commits the journal and flushes the device cache once: it stands for the
//! fsync of every file and directory of the round, so N concurrent messages share one flush.
//! syncfs reports write-back errors since Linux 5.8.
//!
//! Why not `fdatasync` per file: ext4 flushes the device cache on every fsync, and on the
//! virtual disks measured here one flush costs milliseconds: the benchmark fell from about
//! 2,000 to under 100 messages per second. The price of `syncfs` is that it also writes back
//! whatever else is dirty on the same file system; on a busy host, give `data_dir` (and the
//! Maildir root) a file system of their own.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use tokio::sync::oneshot;

struct Request {
    files: Vec<File>,
    dirs: Vec<PathBuf>,
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

    /// Makes the data of `files` and the entries of `dirs` durable: everything written on
    /// their file systems before the call is (one `syncfs` per file system). Give the files
    /// just written, not only their directories: a write-back error of their data is reported
    /// through a handle opened before it was written. The files are closed afterwards.
    pub async fn sync(&self, files: Vec<File>, dirs: Vec<PathBuf>) -> io::Result<()> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Request { files, dirs, done })
            .map_err(|_| io::Error::other("syncer stopped"))?;
        wait.await.map_err(|_| io::Error::other("syncer stopped"))?
    }

    /// Makes the entries of one directory durable (after a rename or an unlink).
    pub async fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        self.sync(Vec::new(), vec![dir.to_path_buf()]).await
    }
}

fn run(rx: mpsc::Receiver<Request>) {
    // One open handle per file system (any descriptor on it will do for syncfs), and the
    // device of each directory seen.
    let mut fs_handles: HashMap<u64, File> = HashMap::new();
    let mut dir_devs: HashMap<PathBuf, u64> = HashMap::new();
    while let Ok(first) = rx.recv() {
        let mut round = vec![first];
        while let Ok(more) = rx.try_recv() {
            round.push(more);
        }
        // The file systems each request touches. A file system first met through a file (not
        // a directory) is synced through that file for this round only: a handle kept on a
        // file would pin its space after the file is deleted (a spool file delivered and
        // removed, a mail deleted from a Maildir) until the server stops.
        let mut round_handles: HashMap<u64, File> = HashMap::new();
        let mut wanted: Vec<io::Result<Vec<u64>>> = Vec::with_capacity(round.len());
        for req in &round {
            wanted.push(devices(
                req,
                &mut fs_handles,
                &mut round_handles,
                &mut dir_devs,
            ));
        }
        let mut done: HashMap<u64, Result<(), (io::ErrorKind, String)>> = HashMap::new();
        for devs in wanted.iter().flatten() {
            for dev in devs {
                if done.contains_key(dev) {
                    continue;
                }
                // Through a file of the round when there is one: it was opened before its
                // data was written, so a write-back error of that data is reported to it
                // even if another handle saw the error first (syncfs reports an error once
                // per open file description).
                let r = match round_handles.get(dev).or_else(|| fs_handles.get(dev)) {
                    Some(f) => syncfs(f),
                    None => Err(io::Error::other("no handle for file system")),
                };
                if r.is_err() {
                    // Opened again by the next request that names a directory on it.
                    fs_handles.remove(dev);
                    dir_devs.retain(|_, d| d != dev);
                }
                done.insert(*dev, r.map_err(|e| (e.kind(), e.to_string())));
            }
        }
        for (req, devs) in round.into_iter().zip(wanted) {
            let result = devs.and_then(|devs| {
                for dev in devs {
                    if let Some(Err((kind, msg))) = done.get(&dev) {
                        return Err(io::Error::new(*kind, msg.clone()));
                    }
                }
                Ok(())
            });
            drop(req.files);
            let _ = req.done.send(result);
        }
        if dir_devs.len() > 4096 {
            dir_devs.clear();
        }
    }
}

/// The devices of a request's files and directories; keeps a handle for each new device.
fn devices(
    req: &Request,
    fs_handles: &mut HashMap<u64, File>,
    round_handles: &mut HashMap<u64, File>,
    dir_devs: &mut HashMap<PathBuf, u64>,
) -> io::Result<Vec<u64>> {
    let mut devs = Vec::with_capacity(1);
    for f in &req.files {
        let dev = f.metadata()?.dev();
        if let std::collections::hash_map::Entry::Vacant(e) = round_handles.entry(dev) {
            e.insert(f.try_clone()?);
        }
        if !devs.contains(&dev) {
            devs.push(dev);
        }
    }
    for d in &req.dirs {
        let dev = match dir_devs.get(d) {
            Some(dev) => *dev,
            None => {
                let h = File::open(d)?;
                let dev = h.metadata()?.dev();
                fs_handles.entry(dev).or_insert(h);
                dir_devs.insert(d.clone(), dev);
                dev
            }
        };
        if !devs.contains(&dev) {
            devs.push(dev);
        }
    }
    Ok(devs)
}

fn syncfs(f: &File) -> io::Result<()> {
    // SAFETY: syncfs takes an open file descriptor, which `f` keeps open for the call.
    let rc = unsafe { libc::syncfs(f.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
