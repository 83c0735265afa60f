//! What `check-config` (and a reload) checks beyond the file's syntax and values: whether the
//! server can run with this configuration on this host, as the user it will run as — the
//! `user` exists, the certificate and key exist and can be read, the users file and the
//! smarthost credentials can be read, and `data_dir` and the sockets' directories can be
//! written (or created): without any of these the server does not start. Each domain's
//! Maildir directory is a warning ([`host_warnings`]): the server runs without it, and mail
//! for that domain waits in the queue.

use std::path::{Path, PathBuf};

use estafeta_config::Config;

use crate::privileges::{self, Access, Account};

/// Every problem found, each naming the file and what to change; empty when none.
pub fn host_problems(cfg: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    let account: Option<Account> = match &cfg.user {
        Some(user) => match privileges::lookup(user, cfg.group.as_deref()) {
            Ok(a) => Some(a),
            Err(e) => {
                problems.push(format!("user: {e}"));
                return problems;
            }
        },
        None => None,
    };
    let (uid, gids) = privileges::identity(account.as_ref());
    let who = account
        .as_ref()
        .map(|a| format!("the user {} (group {})", a.user, a.group))
        .unwrap_or_else(|| {
            let name = privileges::user_name(uid).unwrap_or_else(|| uid.to_string());
            format!("the user {name}, which runs this check (no `user` is set)")
        });
    let mut missing = Vec::new();
    let mut need = |path: &Path, want: Access, what: &str, hint: &str| {
        if let Err(e) = privileges::check_access(path, uid, &gids, want) {
            problems.push(format!("{what}: {e}: the server runs as {who}; {hint}"));
        }
    };
    for (key, path) in [
        ("tls.certificate", &cfg.tls.certificate),
        ("tls.private_key", &cfg.tls.private_key),
    ] {
        if let Some(path) = path {
            if !path.exists() {
                missing.push(format!(
                    "{key}: {} does not exist: point it at your certificate files (or remove [tls] for a self-signed certificate)",
                    path.display()
                ));
            } else {
                need(
                    path,
                    Access::Read,
                    key,
                    "make it readable by that user or its group (e.g. chgrp estafeta FILE; chmod g+r FILE), also after each renewal (a deploy hook)",
                );
            }
        }
    }
    if cfg.auth.users_file.exists() {
        need(
            &cfg.auth.users_file,
            Access::Read,
            "auth.users_file",
            "`estafeta user add` run as root gives a new file to the configured user; or chown it",
        );
    }
    if let Some(path) = &cfg.relay.smarthost_credentials {
        need(
            path,
            Access::Read,
            "relay.smarthost_credentials",
            "chown it to that user, mode 0600",
        );
    }
    for (i, k) in cfg.dkim.iter().enumerate() {
        let key = format!("dkim[{i}].private_key");
        if !k.private_key.exists() {
            missing.push(format!(
                "{key}: {} does not exist: create it with `estafeta dkim generate {} --selector {} --algorithm {}`",
                k.private_key.display(),
                k.domain,
                k.selector,
                k.algorithm.name()
            ));
            continue;
        }
        need(
            &k.private_key,
            Access::Read,
            &key,
            "chown it to that user, mode 0600",
        );
        // Mode and content (read as whoever runs this check).
        if let Err(e) = estafeta_mailauth::keys::load(k)
            && !matches!(e, estafeta_mailauth::keys::KeyError::Read { .. })
        {
            missing.push(format!("{key}: {e}"));
        }
    }
    if let Some(srs) = &cfg.srs {
        if srs.secret_file.exists() {
            need(
                &srs.secret_file,
                Access::Read,
                "srs.secret_file",
                "chown it to that user, mode 0600",
            );
        } else if let Some(dir) = srs
            .secret_file
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            need(
                dir,
                Access::WriteDir,
                "srs.secret_file",
                "the secret is created at the first start: its directory must be writable by that user, or create the file (one random line, mode 0600)",
            );
        }
    }
    need(
        &cfg.data_dir,
        Access::WriteDir,
        "data_dir",
        "create it owned by that user, mode 0700 (the systemd unit's StateDirectory= does)",
    );
    for (key, socket) in [
        ("control.socket", &cfg.control.socket),
        ("control.submit_socket", &cfg.control.submit_socket),
    ] {
        if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
            need(
                dir,
                Access::WriteDir,
                key,
                "the socket's directory must be writable by that user (the unit's RuntimeDirectory= /run/estafeta is)",
            );
        }
    }
    problems.extend(missing);
    problems
}

/// The directories each local domain's Maildirs are created in: the template up to the
/// component holding `{user}`, with `{domain}` filled in.
fn maildir_roots(cfg: &Config) -> Vec<PathBuf> {
    let template = Path::new(&cfg.delivery.maildir);
    let mut prefix = PathBuf::new();
    for c in template.components() {
        if c.as_os_str().to_string_lossy().contains("{user}") {
            break;
        }
        prefix.push(c);
    }
    let prefix = prefix.to_string_lossy().into_owned();
    let mut roots: Vec<PathBuf> = cfg
        .domains
        .iter()
        .map(|d| PathBuf::from(prefix.replace("{domain}", &d.name)))
        .collect();
    roots.sort();
    roots.dedup();
    roots
}

/// What works, but not for everyone: the submit socket in a directory other local users
/// cannot enter (the default `data_dir/submit.sock` under a 0700 `data_dir`), so `sendmail`
/// works only for the service user and root.
///
/// Also each domain's Maildir directory that the server's user cannot create mailboxes in:
/// the server starts and serves the other domains, and deliveries there are deferred
/// (retried) until the directory is fixed — worth saying, not worth refusing to start.
pub fn host_warnings(cfg: &Config) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let mut warnings = Vec::new();
    if let Ok(account) = cfg
        .user
        .as_deref()
        .map(|u| privileges::lookup(u, cfg.group.as_deref()))
        .transpose()
    {
        let (uid, gids) = privileges::identity(account.as_ref());
        for dir in maildir_roots(cfg) {
            if let Err(e) = privileges::check_access(&dir, uid, &gids, Access::WriteDir) {
                warnings.push(format!(
                    "delivery.maildir: {e}: mail for this domain will wait in the queue until the server's user may create mailboxes there (install -d -o estafeta -g estafeta -m 0700 DIR)"
                ));
            }
        }
    }
    let socket = &cfg.control.submit_socket;
    let absolute = std::env::current_dir()
        .map(|d| d.join(socket))
        .unwrap_or_else(|_| socket.clone());
    for dir in absolute.ancestors().skip(1) {
        if let Ok(meta) = std::fs::metadata(dir)
            && meta.mode() & 0o001 == 0
        {
            warnings.push(format!(
                "control.submit_socket: other users cannot enter {} (mode {:o}), so `sendmail` works only for the server's user and root: set submit_socket = \"/run/estafeta/submit.sock\" (the unit's RuntimeDirectory, mode 0755)",
                dir.display(),
                meta.mode() & 0o7777
            ));
            break;
        }
    }
    warnings
}
