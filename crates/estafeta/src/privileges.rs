//! Who the server runs as: looking up the `user`/`group` of the configuration, dropping root
//! for good after the sockets are bound, and checking — as that user — that the files the
//! server needs can be read and written (`check-config`).
//!
//! The drop happens in `main` before the multi-threaded runtime starts: `setuid(2)` changes
//! only the calling thread's credentials at the system-call level (glibc broadcasts it to
//! other threads, but nothing here relies on that), so there must be no other thread yet.

use std::ffi::{CStr, CString};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A system account the server runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// The user name.
    pub user: String,
    /// Its uid.
    pub uid: u32,
    /// The group the server runs with (the configured one, or the user's primary group).
    pub gid: u32,
    /// Its name.
    pub group: String,
}

/// The effective uid of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid(2) takes nothing and cannot fail.
    unsafe { libc::geteuid() }
}

fn buffer() -> Vec<libc::c_char> {
    vec![0; 16 * 1024]
}

/// Looks up `user` and `group` (default: the user's primary group) in the system's account
/// databases (`/etc/passwd`, NSS).
pub fn lookup(user: &str, group: Option<&str>) -> Result<Account, String> {
    let c_user = CString::new(user).map_err(|_| format!("invalid user name {user:?}"))?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = buffer();
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; the buffer outlives the use of `pwd`.
    let rc = unsafe {
        libc::getpwnam_r(
            c_user.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(format!(
            "user {user:?} does not exist on this host (create it: `systemd-sysusers`, or `adduser --system --group {user}`)"
        ));
    }
    let uid = pwd.pw_uid;
    let primary = pwd.pw_gid;
    let (gid, group) = match group {
        None => (
            primary,
            group_name(primary).unwrap_or_else(|| primary.to_string()),
        ),
        Some(g) => (group_id(g)?, g.to_string()),
    };
    Ok(Account {
        user: user.to_string(),
        uid,
        gid,
        group,
    })
}

/// The gid of group `name`.
fn group_id(name: &str) -> Result<u32, String> {
    let c = CString::new(name).map_err(|_| format!("invalid group name {name:?}"))?;
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = buffer();
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call.
    let rc = unsafe {
        libc::getgrnam_r(
            c.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut result,
        )
    };
    if rc != 0 || result.is_null() {
        return Err(format!("group {name:?} does not exist on this host"));
    }
    Ok(grp.gr_gid)
}

/// The name of group `gid`, if it has one.
fn group_name(gid: u32) -> Option<String> {
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut buf = buffer();
    let mut result: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; the name is copied before `buf` goes.
    let rc = unsafe { libc::getgrgid_r(gid, &mut grp, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: gr_name points into `buf`, NUL-terminated.
    Some(
        unsafe { CStr::from_ptr(grp.gr_name) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// The name of user `uid`, if it has one.
pub fn user_name(uid: u32) -> Option<String> {
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = buffer();
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call; the name is copied before `buf` goes.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    if rc != 0 || result.is_null() {
        return None;
    }
    // SAFETY: pw_name points into `buf`, NUL-terminated.
    Some(
        unsafe { CStr::from_ptr(pwd.pw_name) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// The groups `account` will have: its group and the supplementary groups the account
/// database gives the user (what `initgroups(3)` sets, and what systemd's `User=` gives), so
/// that a user added to `ssl-cert` may read `/etc/ssl/private` after the drop as under the
/// unit.
fn groups_of(account: &Account) -> Vec<u32> {
    let mut groups = vec![account.gid];
    let Ok(user) = CString::new(account.user.as_str()) else {
        return groups;
    };
    let mut n: libc::c_int = 64;
    loop {
        let mut list = vec![0 as libc::gid_t; n as usize];
        let mut count = n;
        // SAFETY: a NUL-terminated name, a buffer of `count` gids.
        let rc = unsafe {
            libc::getgrouplist(user.as_ptr(), account.gid, list.as_mut_ptr(), &mut count)
        };
        if rc >= 0 {
            list.truncate(count.max(0) as usize);
            for g in list {
                if !groups.contains(&g) {
                    groups.push(g);
                }
            }
            return groups;
        }
        if count <= n || n > 65536 {
            return groups;
        }
        n = count;
    }
}

/// Gives `paths` (directories the server created while still root) to `account`.
pub fn hand_over(paths: &[PathBuf], account: &Account) -> Result<(), String> {
    for p in paths {
        std::os::unix::fs::lchown(p, Some(account.uid), Some(account.gid))
            .map_err(|e| format!("cannot give {} to {}: {e}", p.display(), account.user))?;
    }
    Ok(())
}

/// Gives what root left in `data_dir` (an earlier start as root: the spool's files, a
/// generated certificate, the users file) to `account`, two levels deep — not the Maildirs,
/// which may be large and are not root's. Entries owned by anyone else are left alone.
///
/// `data_dir` is writable by the service user, so its entries may be swapped for symbolic
/// links while root walks them (by a compromised service, to be given `/etc/shadow`): the
/// walk never follows a link. Directories are opened with `O_NOFOLLOW` and listed through
/// their open descriptor, and each entry is changed with `fchownat(AT_SYMLINK_NOFOLLOW)`
/// relative to that descriptor.
pub fn hand_over_data_dir(data_dir: &Path, account: &Account) -> Result<(), String> {
    use std::os::fd::{AsRawFd, OwnedFd};
    use std::os::unix::ffi::OsStrExt;
    let err = |what: &Path, e: std::io::Error| format!("{}: {e}", what.display());
    // data_dir itself: its parent (/var/lib) is root's, so the name cannot be swapped.
    let top = open_dir_nofollow(libc::AT_FDCWD, data_dir).map_err(|e| err(data_dir, e))?;
    fchown_if_root(&top, account).map_err(|e| err(data_dir, e))?;
    // (directory descriptor, its path for messages, depth left)
    let mut stack: Vec<(OwnedFd, PathBuf, u32)> = vec![(top, data_dir.to_path_buf(), 2)];
    while let Some((dir, path, depth)) = stack.pop() {
        // The open directory, listed by descriptor: /proc/self/fd/N is that very directory,
        // whatever its name points to now.
        let listing = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd()))
            .map_err(|e| err(&path, e))?;
        for entry in listing {
            let entry = entry.map_err(|e| err(&path, e))?;
            let name = entry.file_name();
            if depth == 2 && name == "mail" {
                continue;
            }
            let child = path.join(&name);
            let c_name = CString::new(name.as_bytes())
                .map_err(|_| format!("{}: bad name", child.display()))?;
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: a valid directory fd, a NUL-terminated name and a stat buffer.
            if unsafe {
                libc::fstatat(
                    dir.as_raw_fd(),
                    c_name.as_ptr(),
                    &mut st,
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            } != 0
            {
                continue; // gone meanwhile
            }
            if st.st_uid == 0 {
                // SAFETY: as above; the link itself (never its target) is changed.
                let rc = unsafe {
                    libc::fchownat(
                        dir.as_raw_fd(),
                        c_name.as_ptr(),
                        account.uid,
                        account.gid,
                        libc::AT_SYMLINK_NOFOLLOW,
                    )
                };
                if rc != 0 {
                    return Err(err(&child, std::io::Error::last_os_error()));
                }
            }
            if depth > 1 && (st.st_mode & libc::S_IFMT) == libc::S_IFDIR {
                match open_dir_nofollow(dir.as_raw_fd(), Path::new(&name)) {
                    Ok(fd) => stack.push((fd, child, depth - 1)),
                    // Swapped for a link (ELOOP) or gone since: not walked.
                    Err(_) => continue,
                }
            }
        }
    }
    Ok(())
}

/// Opens the directory `name` relative to `dirfd` without following a symbolic link.
fn open_dir_nofollow(dirfd: libc::c_int, name: &Path) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    use std::os::unix::ffi::OsStrExt;
    let c = CString::new(name.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: a valid directory fd (or AT_FDCWD) and a NUL-terminated path.
    let fd = unsafe {
        libc::openat(
            dirfd,
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor this function owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) })
}

/// Gives the open file or directory to `account` when root owns it.
fn fchown_if_root(fd: &std::os::fd::OwnedFd, account: &Account) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a stat buffer.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    if st.st_uid == 0 {
        // SAFETY: a valid descriptor.
        if unsafe { libc::fchown(fd.as_raw_fd(), account.uid, account.gid) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Gives a file that root just created for the server (the users file) to `account`, when it
/// is root's: the server, running as `account`, must be able to read it. The file is opened
/// without following a symbolic link (its directory may be the service user's, who could
/// have swapped it for a link to a system file) and changed through that descriptor.
pub fn give_file(path: &Path, account: &Account) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", path.display()));
    }
    if meta.uid() == 0 {
        std::os::unix::fs::fchown(&file, Some(account.uid), Some(account.gid))
            .map_err(|e| format!("cannot give {} to {}: {e}", path.display(), account.user))?;
    }
    Ok(())
}

/// Switches this (still single-threaded) process to `account` for good: supplementary
/// groups, then the group, then the user — in that order, since after `setuid` the others
/// are no longer allowed — and verifies that root cannot be regained.
pub fn drop_to(account: &Account) -> Result<(), String> {
    let groups: Vec<libc::gid_t> = groups_of(account);
    // SAFETY: plain system calls with valid arguments; no other thread exists yet.
    unsafe {
        if libc::setgroups(groups.len(), groups.as_ptr()) != 0 {
            return Err(format!("setgroups: {}", std::io::Error::last_os_error()));
        }
        if libc::setgid(account.gid) != 0 {
            return Err(format!(
                "setgid({}): {}",
                account.gid,
                std::io::Error::last_os_error()
            ));
        }
        if libc::setuid(account.uid) != 0 {
            return Err(format!(
                "setuid({}): {}",
                account.uid,
                std::io::Error::last_os_error()
            ));
        }
    }
    // SAFETY: plain queries; setuid(0) must fail now.
    let (uid, euid, gid, egid, regained) = unsafe {
        (
            libc::getuid(),
            libc::geteuid(),
            libc::getgid(),
            libc::getegid(),
            account.uid != 0 && libc::setuid(0) == 0,
        )
    };
    if regained
        || uid != account.uid
        || euid != account.uid
        || gid != account.gid
        || egid != account.gid
    {
        return Err(format!(
            "the switch to {}:{} did not hold (uid {uid}, euid {euid}, gid {gid}, egid {egid}, root regained: {regained})",
            account.user, account.group
        ));
    }
    Ok(())
}

/// What access to check for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read a file.
    Read,
    /// Create and write files in a directory (write + search).
    WriteDir,
}

/// Whether `uid` (with groups `gids`) may access `path` as `want`, from its mode bits and
/// owners and those of every directory above it (search permission). ACLs are not looked
/// at. A path that does not exist yet is judged by the nearest existing directory above it,
/// which must let the user create it.
pub fn check_access(path: &Path, uid: u32, gids: &[u32], want: Access) -> Result<(), String> {
    if uid == 0 {
        return Ok(());
    }
    let allowed = |meta: &std::fs::Metadata, bits: u32| -> bool {
        let mode = meta.mode();
        let shift = if meta.uid() == uid {
            6
        } else if gids.contains(&meta.gid()) {
            3
        } else {
            0
        };
        (mode >> shift) & bits == bits
    };
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    };
    // The nearest existing ancestor-or-self.
    let mut existing = absolute.as_path();
    let mut missing = false;
    while std::fs::metadata(existing).is_err() {
        missing = true;
        match existing.parent() {
            Some(p) => existing = p,
            None => return Err(format!("{}: no such path", path.display())),
        }
    }
    // Search permission on every directory above it.
    for dir in existing.ancestors().skip(1) {
        if let Ok(meta) = std::fs::metadata(dir)
            && !allowed(&meta, 0o1)
        {
            return Err(format!(
                "{}: the directory {} may not be entered (mode {:o}, owner {}:{})",
                path.display(),
                dir.display(),
                meta.mode() & 0o7777,
                meta.uid(),
                meta.gid()
            ));
        }
    }
    let meta = std::fs::metadata(existing).map_err(|e| format!("{}: {e}", path.display()))?;
    let describe = |m: &std::fs::Metadata| {
        format!(
            "mode {:o}, owner {}:{}",
            m.mode() & 0o7777,
            user_name(m.uid()).unwrap_or_else(|| m.uid().to_string()),
            group_name(m.gid()).unwrap_or_else(|| m.gid().to_string())
        )
    };
    let ok = match (want, missing) {
        // The file or directory must be created in `existing`.
        (_, true) => meta.is_dir() && allowed(&meta, 0o3),
        (Access::Read, false) => allowed(&meta, 0o4),
        (Access::WriteDir, false) => meta.is_dir() && allowed(&meta, 0o3),
    };
    if ok {
        return Ok(());
    }
    Err(match (want, missing) {
        (_, true) => format!(
            "{} does not exist and cannot be created in {} ({})",
            path.display(),
            existing.display(),
            describe(&meta)
        ),
        (Access::Read, false) => format!("{} cannot be read ({})", path.display(), describe(&meta)),
        (Access::WriteDir, false) => {
            format!("{} cannot be written ({})", path.display(), describe(&meta))
        }
    })
}

/// The uid and groups checks are made for: `account`'s, or this process's own.
pub fn identity(account: Option<&Account>) -> (u32, Vec<u32>) {
    match account {
        Some(a) => (a.uid, groups_of(a)),
        None => {
            // SAFETY: plain queries.
            let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
            let mut groups = vec![gid];
            // SAFETY: a first call with 0 returns the count; the second fills the vector.
            let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
            if n > 0 {
                let mut extra = vec![0 as libc::gid_t; n as usize];
                let got = unsafe { libc::getgroups(n, extra.as_mut_ptr()) };
                if got > 0 {
                    extra.truncate(got as usize);
                    groups.extend(extra);
                }
            }
            (uid, groups)
        }
    }
}
