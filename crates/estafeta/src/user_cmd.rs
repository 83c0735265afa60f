//! `estafeta user add|passwd|del|list`: manage the users file named by `[auth] users_file`.
//!
//! Every change is atomic (temporary file, fsync, rename, directory fsync) and the file keeps its
//! comments. A running server needs no signal or restart: it notices that the file changed
//! (it looks at most once a second) and reloads it by itself.

use std::fs::File;
use std::io::{self, BufRead, BufReader, IsTerminal, Write};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;
use estafeta_config::Config;

/// The `user` subcommands.
#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// Add a user; asks for the password twice on the terminal.
    Add {
        /// The user's address (also the AUTH user name), e.g. alice@example.org.
        address: String,
        /// Read the password from the first line of standard input instead of the terminal.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Change a user's password; asks for the new one twice on the terminal.
    Passwd {
        /// The user's address.
        address: String,
        /// Read the password from the first line of standard input instead of the terminal.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Delete a user.
    Del {
        /// The user's address.
        address: String,
    },
    /// List the users, one address a line.
    List,
}

/// Runs a `user` subcommand against the users file of `cfg`. Exit code 0 when done, 1 (with a
/// message on standard error) on any error.
pub fn run(command: UserCommand, cfg: &Config) -> ExitCode {
    let path = cfg.auth.users_file.as_path();
    if let UserCommand::Add { address, .. } = &command {
        warn_if_not_local(cfg, address);
    }
    let result = execute(command, path).and_then(|()| give_to_service_user(cfg, path));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("estafeta user: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The shortest password accepted (NIST SP 800-63B's minimum for passwords a user chooses).
pub const MIN_PASSWORD_LENGTH: usize = 8;

/// A user whose domain is not one of the configuration's cannot receive mail here (they can
/// still authenticate and send): said, not refused.
fn warn_if_not_local(cfg: &Config, address: &str) {
    let domain = address.rsplit_once('@').map(|(_, d)| d).unwrap_or("");
    if cfg.domain(domain).is_none() {
        eprintln!(
            "estafeta user: warning: {domain} is not a local domain of this configuration: {address} may authenticate and send, but mail to {address} is not delivered here (add a [[domain]] name = \"{domain}\" to receive it)"
        );
    }
}

/// Run as root for a server that runs as `user`, the users file must belong to that user, or
/// the server cannot read it (it is mode 0600). Files owned by someone else than root are
/// left alone.
fn give_to_service_user(cfg: &Config, path: &Path) -> Result<(), String> {
    let Some(user) = &cfg.user else {
        return Ok(());
    };
    if crate::privileges::euid() != 0 || !path.exists() {
        return Ok(());
    }
    let account = crate::privileges::lookup(user, cfg.group.as_deref())?;
    crate::privileges::give_file(path, &account)
}

fn execute(command: UserCommand, path: &Path) -> Result<(), String> {
    match command {
        UserCommand::Add {
            address,
            password_stdin,
        } => {
            let address = checked_address(&address)?;
            let users = estafeta_auth::Users::open(path).map_err(|e| e.to_string())?;
            // Refuse before asking for a password that would be thrown away.
            if users.contains(&address) {
                return Err(format!("{address} already exists in {}", path.display()));
            }
            let hash = new_password_hash(&address, password_stdin)?;
            estafeta_auth::add_user(path, &address, &hash).map_err(|e| e.to_string())?;
            println!("added {address} to {}", path.display());
        }
        UserCommand::Passwd {
            address,
            password_stdin,
        } => {
            let address = checked_address(&address)?;
            let users = estafeta_auth::Users::open(path).map_err(|e| e.to_string())?;
            if !users.contains(&address) {
                return Err(format!("no user {address} in {}", path.display()));
            }
            let hash = new_password_hash(&address, password_stdin)?;
            estafeta_auth::set_password(path, &address, &hash).map_err(|e| e.to_string())?;
            println!("changed the password of {address} in {}", path.display());
        }
        UserCommand::Del { address } => {
            let address = checked_address(&address)?;
            estafeta_auth::delete_user(path, &address).map_err(|e| e.to_string())?;
            println!("deleted {address} from {}", path.display());
        }
        UserCommand::List => {
            let users = estafeta_auth::Users::open(path).map_err(|e| e.to_string())?;
            for warning in users.warnings() {
                eprintln!("warning: {warning}");
            }
            let mut out = io::stdout().lock();
            for address in users.addresses() {
                writeln!(out, "{address}").map_err(|e| e.to_string())?;
            }
        }
    }
    Ok(())
}

fn checked_address(address: &str) -> Result<String, String> {
    estafeta_auth::validate_address(address).map_err(|e| e.to_string())?;
    Ok(address.to_ascii_lowercase())
}

/// Reads the new password (standard input or terminal) and hashes it.
fn new_password_hash(address: &str, from_stdin: bool) -> Result<String, String> {
    let password = if from_stdin {
        read_password_stdin()?
    } else {
        read_password_tty(address)?
    };
    if password.chars().count() < MIN_PASSWORD_LENGTH {
        return Err(format!(
            "the password is too short: at least {MIN_PASSWORD_LENGTH} characters; nothing was changed"
        ));
    }
    estafeta_auth::hash_password(&password).map_err(|e| e.to_string())
}

fn read_password_stdin() -> Result<String, String> {
    let mut line = String::new();
    io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| format!("reading the password from standard input: {e}"))?;
    let password = strip_newline(&line);
    if password.is_empty() {
        return Err("empty password on standard input: nothing was changed".to_string());
    }
    Ok(password.to_string())
}

fn strip_newline(line: &str) -> &str {
    let line = line.strip_suffix('\n').unwrap_or(line);
    line.strip_suffix('\r').unwrap_or(line)
}

/// Asks twice on the controlling terminal, with echo off.
fn read_password_tty(address: &str) -> Result<String, String> {
    let no_terminal = || {
        "no terminal to ask for the password on: use --password-stdin \
         (e.g. `printf '%s\\n' \"$PW\" | estafeta user add ADDRESS --password-stdin`)"
            .to_string()
    };
    let tty = File::options()
        .read(true)
        .write(true)
        .open("/dev/tty")
        .map_err(|_| no_terminal())?;
    if !tty.is_terminal() {
        return Err(no_terminal());
    }
    let first = prompt_no_echo(&tty, &format!("Password for {address}: "))?;
    if first.is_empty() {
        return Err("empty password: nothing was changed".to_string());
    }
    let second = prompt_no_echo(&tty, "Retype the password: ")?;
    if first != second {
        return Err("the passwords do not match: nothing was changed".to_string());
    }
    Ok(first)
}

/// Restores the terminal's settings when dropped (also on an early return).
struct EchoOff<'a> {
    tty: &'a File,
    saved: libc::termios,
}

impl<'a> EchoOff<'a> {
    fn new(tty: &'a File) -> io::Result<EchoOff<'a>> {
        let fd = tty.as_raw_fd();
        // SAFETY: termios is plain old data; tcgetattr fills it for an open terminal fd.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is open for the lifetime of `tty`; `saved` is a valid termios to write to.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut quiet = saved;
        // No echo of the characters typed, but still of the final newline.
        quiet.c_lflag &= !libc::ECHO;
        quiet.c_lflag |= libc::ECHONL;
        // SAFETY: as above; `quiet` is a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSAFLUSH, &quiet) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(EchoOff { tty, saved })
    }
}

impl Drop for EchoOff<'_> {
    fn drop(&mut self) {
        // SAFETY: restores the settings read in `new` on the same open fd.
        unsafe { libc::tcsetattr(self.tty.as_raw_fd(), libc::TCSAFLUSH, &self.saved) };
    }
}

fn prompt_no_echo(tty: &File, prompt: &str) -> Result<String, String> {
    let io_error = |e: io::Error| format!("reading the password from the terminal: {e}");
    let mut writer = tty;
    writer.write_all(prompt.as_bytes()).map_err(io_error)?;
    writer.flush().map_err(io_error)?;
    let guard = EchoOff::new(tty).map_err(io_error)?;
    let mut line = String::new();
    let read = BufReader::new(tty).read_line(&mut line).map_err(io_error)?;
    drop(guard);
    if read == 0 {
        // End of input (Ctrl-D) before a newline.
        writer.write_all(b"\n").map_err(io_error)?;
        return Err("no password given: nothing was changed".to_string());
    }
    Ok(strip_newline(&line).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_one_line_ending_only() {
        assert_eq!(strip_newline("pw\n"), "pw");
        assert_eq!(strip_newline("pw\r\n"), "pw");
        assert_eq!(strip_newline("pw"), "pw");
        assert_eq!(strip_newline(" pw \n"), " pw ");
        assert_eq!(strip_newline("\n"), "");
    }
}
