//! Looking at the system: the server's memory, our file descriptor limit, Maildir contents.

use std::fs;
use std::path::Path;

/// Memory figures of a process, in KiB, from /proc/PID/status.
#[derive(Clone, Copy, Debug)]
pub struct Mem {
    /// VmHWM: peak resident set size.
    pub peak_kib: u64,
    /// VmRSS: current resident set size.
    pub rss_kib: u64,
}

pub fn mem(pid: u32) -> Option<Mem> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = status.lines().find(|l| l.starts_with(name))?;
        line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some(Mem {
        peak_kib: field("VmHWM:")?,
        rss_kib: field("VmRSS:")?,
    })
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit; returns the soft limit in force.
pub fn raise_nofile() -> libc::rlim_t {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 0;
    }
    if lim.rlim_cur < lim.rlim_max {
        let mut want = lim;
        want.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit only reads the struct.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            return want.rlim_cur;
        }
        // An infinite hard limit is refused above fs.nr_open: try that value.
        if let Some(nr_open) = fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
        {
            want.rlim_cur = nr_open.min(lim.rlim_max);
            // SAFETY: as above.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
                return want.rlim_cur;
            }
        }
    }
    lim.rlim_cur
}

/// Counts messages in `root/*/Maildir/{new,cur}` and `root/*/*/Maildir/{new,cur}`.
/// Missing directories count as empty; names starting with '.' are ignored.
pub fn count_maildir(root: &Path) -> u64 {
    let mut total = 0;
    for a in subdirs(root) {
        total += count_one(&a.join("Maildir"));
        for b in subdirs(&a) {
            total += count_one(&b.join("Maildir"));
        }
    }
    total
}

fn subdirs(dir: &Path) -> Vec<std::path::PathBuf> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| e.file_name() != "Maildir")
        .map(|e| e.path())
        .collect()
}

fn count_one(maildir: &Path) -> u64 {
    let mut n = 0;
    for sub in ["new", "cur"] {
        if let Ok(rd) = fs::read_dir(maildir.join(sub)) {
            n += rd
                .filter_map(Result::ok)
                .filter(|e| !e.file_name().as_encoded_bytes().starts_with(b"."))
                .count() as u64;
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_maildirs_at_both_depths() {
        let root = std::env::temp_dir().join(format!("estafeta-bench-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for (dir, files) in [
            ("example.test/user1/Maildir/new", 3),
            ("example.test/user1/Maildir/cur", 2),
            ("example.test/user1/Maildir/tmp", 5),
            ("user2/Maildir/new", 1),
        ] {
            let d = root.join(dir);
            fs::create_dir_all(&d).unwrap();
            for i in 0..files {
                fs::write(d.join(format!("m{i}")), b"x").unwrap();
            }
        }
        fs::write(root.join("user2/Maildir/new/.hidden"), b"x").unwrap();
        assert_eq!(count_maildir(&root), 6);
        fs::remove_dir_all(&root).unwrap();
        assert_eq!(count_maildir(&root), 0);
    }

    #[test]
    fn own_memory() {
        let m = mem(std::process::id()).expect("own /proc status");
        assert!(m.rss_kib > 0 && m.peak_kib >= m.rss_kib);
    }
}
