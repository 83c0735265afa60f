//! The embedded development default is an ordinary `Config`: the same as what a file with the
//! same settings produces.

use std::path::Path;

use estafeta_config::{Config, system_hostname};

fn file_for(data_dir: &str) -> String {
    format!(
        r#"
hostname = "{hostname}"
data_dir = "{data_dir}"

[[listener]]
kind = "smtp"
address = "127.0.0.1:2525"

[[listener]]
kind = "submission"
address = "127.0.0.1:2587"

[[listener]]
kind = "submissions"
address = "127.0.0.1:2465"

[[domain]]
name = "localhost"
mailboxes = "*"

[[domain]]
name = "example.test"
mailboxes = "*"
"#,
        hostname = system_hostname()
    )
}

#[test]
fn embedded_default_equals_the_equivalent_file() {
    let mut from_file =
        Config::parse(&file_for("./estafeta-data"), Path::new("default.toml")).expect("valid");
    assert_eq!(from_file.source.as_deref(), Some(Path::new("default.toml")));
    from_file.source = None;
    assert_eq!(Config::embedded_default(), from_file);
}

#[test]
fn embedded_default_in_another_directory() {
    let mut from_file =
        Config::parse(&file_for("/tmp/estafeta-test"), Path::new("default.toml")).expect("valid");
    from_file.source = None;
    let config = Config::embedded_default_in(Path::new("/tmp/estafeta-test"));
    assert_eq!(config, from_file);
    assert_eq!(
        config.auth.users_file,
        Path::new("/tmp/estafeta-test/users")
    );
    assert_eq!(
        config.delivery.maildir,
        "/tmp/estafeta-test/mail/{domain}/{user}/Maildir"
    );
    assert_eq!(
        config.control.socket,
        Path::new("/tmp/estafeta-test/control.sock")
    );
}

#[test]
fn embedded_default_values() {
    let config = Config::embedded_default();
    assert_eq!(config.source, None);
    assert_eq!(config.data_dir, Path::new("./estafeta-data"));
    assert_eq!(config.listeners.len(), 3);
    assert_eq!(
        config.listeners[1].kind,
        estafeta_config::ListenerKind::Submission
    );
    assert_eq!(
        config.listeners[2].addresses,
        ["127.0.0.1:2465".parse().unwrap()]
    );
    assert_eq!(
        config.listeners[0].addresses,
        ["127.0.0.1:2525".parse().unwrap()]
    );
    assert_eq!(config.relay.open_relay_ranges(), []);
    assert!(!config.hostname.is_empty());
}

#[test]
fn a_minimal_file_gets_production_defaults() {
    let config = Config::parse("", Path::new("empty.toml")).expect("an empty file is valid");
    assert!(config.domains.is_empty());
    let addresses: Vec<String> = config.listeners[0]
        .addresses
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(addresses, ["0.0.0.0:25", "[::]:25"]);
    assert_eq!(config.auth.users_file, Path::new("./estafeta-data/users"));
    assert_eq!(config.limits.max_message_size, 26_214_400);
    assert_eq!(
        config.queue.delay_warning,
        Some(std::time::Duration::from_secs(4 * 3600))
    );
    assert_eq!(config.delivery.subaddress_separator.as_deref(), Some("+"));
}

#[test]
fn special_values() {
    let text = r#"
[delivery]
subaddress_separator = ""
[queue]
delay_warning = "0s"
[relay]
mynetworks = ["0.0.0.0/0", "192.0.2.1"]
allow_open_relay = true
[relay.routes]
"Example.NET." = "[192.0.2.7]:25"
[[domain]]
name = "Example.ORG."
mailboxes = ["Alice"]
[domain.aliases]
Team = "alice"
"#;
    let config = Config::parse(text, Path::new("special.toml")).expect("valid");
    assert_eq!(config.delivery.subaddress_separator, None);
    assert_eq!(config.queue.delay_warning, None);
    assert_eq!(
        config.relay.open_relay_ranges(),
        ["0.0.0.0/0".parse::<ipnet::IpNet>().unwrap()]
    );
    assert_eq!(config.relay.mynetworks[1], "192.0.2.1/32".parse().unwrap());
    assert_eq!(
        config.relay.routes["example.net"].to_string(),
        "[192.0.2.7]:25"
    );
    assert_eq!(config.domains[0].name, "example.org");
    assert!(config.domain("EXAMPLE.org.").is_some());
    assert_eq!(config.domains[0].aliases["team"], ["alice"]);
}

#[test]
fn nameservers_take_port_53_when_none_is_given() {
    let config = Config::parse(
        "[dns]\nnameservers = [\"127.0.0.1\", \"::1\", \"127.0.0.1:5353\", \"[::1]:5300\"]\n",
        Path::new("dns.toml"),
    )
    .expect("valid");
    let got: Vec<String> = config
        .dns
        .nameservers
        .iter()
        .map(|a| a.to_string())
        .collect();
    assert_eq!(
        got,
        ["127.0.0.1:53", "[::1]:53", "127.0.0.1:5353", "[::1]:5300"]
    );
    let err = Config::parse(
        "[dns]\nnameservers = [\"dns.example\"]\n",
        Path::new("dns.toml"),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("dns.toml:2:16"), "{err}");
}
