//! `estafeta explain`: the policy's decision on a transaction, step by step, with the exact
//! replies, and no network I/O. It runs the same functions as the listener.

use std::net::IpAddr;
use std::process::ExitCode;
use std::sync::Arc;

use estafeta_config::Config;
use estafeta_policy::{Client, Policy, Target, Verdict};
use estafeta_proto::address::{parse_forward_path, parse_reverse_path};
use estafeta_proto::reply;

fn bracket(a: &str) -> String {
    if a.starts_with('<') {
        a.to_string()
    } else {
        format!("<{a}>")
    }
}

/// Prints the decision on MAIL FROM `from` and each of `rcpts` from `client`. Exit code 0 when
/// every recipient would be accepted, 1 otherwise (2 on unparsable input).
pub fn run(
    cfg: &Config,
    client: IpAddr,
    auth: Option<String>,
    from: &str,
    rcpts: &[String],
) -> ExitCode {
    let users = estafeta_auth::Users::open(&cfg.auth.users_file)
        .ok()
        .map(Arc::new);
    let mut policy = Policy::new(cfg);
    if let Some(users) = users {
        policy = policy.with_users(Arc::new(move |a: &str| users.contains(a)));
    }
    let source = cfg
        .source
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "the embedded default".into());
    println!("configuration: {source}");
    let who = Client {
        ip: client,
        user: auth.as_ref().map(|u| u.to_lowercase()),
        local_uid: None,
    };
    let reverse = match parse_reverse_path(&bracket(from)) {
        Ok((r, _)) => r,
        Err(e) => {
            println!("MAIL FROM:{} → 501 (bad address: {e:?})", bracket(from));
            return ExitCode::from(2);
        }
    };
    println!("MAIL FROM:{}", bracket(from));
    match &who.user {
        Some(user) => {
            let owned = policy.sender_owned(user, &reverse);
            println!(
                "  authenticated as {user}: the sender is {}owned by this user{}",
                if owned { "" } else { "NOT " },
                if owned {
                    String::new()
                } else {
                    format!(
                        " → on listeners with sender_check: {}",
                        reply::sender_not_owned(&reverse.to_string(), user)
                    )
                }
            );
        }
        None => println!(
            "  not authenticated (submission listeners would answer: {})",
            reply::auth_required()
        ),
    }
    println!("  → {}", reply::mail_ok());
    let mut all_ok = true;
    for r in rcpts {
        println!("RCPT TO:{}", bracket(r));
        let fp = match parse_forward_path(&bracket(r)) {
            Ok((fp, _)) => fp,
            Err(e) => {
                println!("  → 501 5.1.3 (bad address: {e:?})");
                all_ok = false;
                continue;
            }
        };
        let (verdict, steps) = policy.explain_rcpt(&who, &fp);
        for s in steps {
            println!("  {s}");
        }
        match verdict {
            Verdict::Accept(targets) => {
                let list: Vec<String> = targets
                    .iter()
                    .map(|t| match t {
                        Target::Local(mb) => format!("{} (local mailbox)", mb.address()),
                        // The embedded development default never sends mail to other
                        // servers (CONFIG.md): it keeps such mail in the queue.
                        Target::Remote(a) if cfg.source.is_none() => {
                            format!("{a} (kept in the queue: the embedded default never relays)")
                        }
                        Target::Remote(a) => format!("{a} (relayed)"),
                    })
                    .collect();
                println!("  delivered to: {}", list.join(", "));
                println!("  → {}", reply::rcpt_ok());
            }
            Verdict::Reject(rep) => {
                all_ok = false;
                println!("  → {rep}");
            }
        }
    }
    if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
