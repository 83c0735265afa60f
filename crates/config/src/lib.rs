//! estafeta's configuration: the TOML file a user writes (see `config/estafeta.toml` and
//! `CONFIG.md`), parsed into serde structs that mirror it, then checked and completed with
//! defaults into a [`Config`].
//!
//! Every problem in a file is reported at once, each with `file:line:column`, the dotted key,
//! what is wrong and what to change; see [`ConfigError`].

#![warn(missing_docs)]

mod default;
mod duration;
mod error;
mod load;
mod raw;
mod size;
mod tree;
mod types;
mod validate;
mod value;

use std::path::Path;

pub use default::system_hostname;
pub use error::{ConfigError, ConfigErrors};
pub use types::{
    AntispamConfig, AuthConfig, CheckMode, Config, ControlConfig, DeliveryConfig, DkimAlgorithm,
    DkimKeyConfig, DnsConfig, DnsblZone, Domain, DomainDelivery, ExpnMode, IpVersion, Limits,
    Listener, ListenerKind, LogConfig, LogFormat, LogLevel, Mailboxes, MetricsConfig, MilterConfig,
    MilterDefault, NextHop, PipeConfig, QueueConfig, Rate, RelayConfig, SmarthostTls, SmtpConfig,
    SrsConfig, TlsConfig, VerifyConfig, VrfyMode,
};

impl Config {
    /// Reads and validates the configuration file at `path`.
    pub fn from_file(path: &Path) -> Result<Config, ConfigErrors> {
        load::from_file(path)
    }

    /// Validates configuration text. `origin` names the file in error messages (and becomes
    /// [`Config::source`]); it is not read.
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigErrors> {
        load::parse(text, origin)
    }
}
