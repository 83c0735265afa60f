//! Configuration errors: each names the file, the position, the dotted key, what is wrong and
//! what to change.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::DeTable;

use crate::tree::{format_path, locate};

/// One problem found in a configuration file.
///
/// Displayed as
///
/// ```text
/// estafeta.toml:12:11: error: limits.max_message_size: invalid size "25 megs"
///   help: use a number with an optional unit: "25MB", "512KiB", "1G", "4096"
/// ```
///
/// `line` and `column` are 1-based; both are 0 when the error has no position in the file (for
/// example when the file cannot be read), and the position is then left out of the message, as
/// is the key when it is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the error is in, as it was given to the loader.
    pub file: PathBuf,
    /// 1-based line of the offending key or value; 0 when unknown.
    pub line: usize,
    /// 1-based column (in characters) of the offending key or value; 0 when unknown.
    pub column: usize,
    /// Dotted path of the offending key, e.g. `limits.max_message_size` or `domain[1].name`
    /// (array-of-tables indices are 0-based); empty for errors not tied to a key.
    pub key: String,
    /// What is wrong.
    pub message: String,
    /// What to change, when there is something useful to say.
    pub help: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        write!(f, ": error: ")?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        write!(f, "{}", self.message)?;
        if let Some(help) = &self.help {
            write!(f, "\n  help: {help}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found in a configuration file, in file order.
///
/// `Display` prints each error as one block (a line, plus a `  help:` line when there is help),
/// blocks separated by a newline, with no trailing newline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl ConfigErrors {
    /// The number of errors.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are no errors (never the case for a returned `Err`).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Iterates over the errors.
    pub fn iter(&self) -> std::slice::Iter<'_, ConfigError> {
        self.0.iter()
    }
}

impl IntoIterator for ConfigErrors {
    type Item = ConfigError;
    type IntoIter = std::vec::IntoIter<ConfigError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// Collects errors for one file and turns byte spans into line, column and key.
pub(crate) struct Reporter<'a> {
    file: &'a Path,
    text: &'a str,
    root: Option<&'a DeTable<'a>>,
    line_starts: Vec<usize>,
    /// Errors found so far, with the byte offset they were found at (for sorting).
    errors: Vec<(usize, ConfigError)>,
}

impl<'a> Reporter<'a> {
    pub(crate) fn new(file: &'a Path, text: &'a str, root: Option<&'a DeTable<'a>>) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        Reporter {
            file,
            text,
            root,
            line_starts,
            errors: Vec::new(),
        }
    }

    /// 1-based line and column (in characters) of a byte offset.
    pub(crate) fn position(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&start| start <= offset) - 1;
        let start = self.line_starts[line];
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count());
        (line + 1, column + 1)
    }

    /// The dotted key a span points at (empty when it points at no key).
    pub(crate) fn key_at(&self, span: &Range<usize>) -> String {
        self.root
            .and_then(|root| locate(root, span))
            .map(|path| format_path(&path))
            .unwrap_or_default()
    }

    /// Records an error at a byte span, named by the key the span points at.
    pub(crate) fn at(
        &mut self,
        span: Range<usize>,
        message: impl Into<String>,
        help: impl Into<Option<String>>,
    ) {
        let key = self.key_at(&span);
        self.error(span, key, message, help.into());
    }

    /// Records an error at a byte span with an explicit key.
    pub(crate) fn error(
        &mut self,
        span: Range<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
        help: Option<String>,
    ) {
        let (line, column) = self.position(span.start);
        self.errors.push((
            span.start,
            ConfigError {
                file: self.file.to_path_buf(),
                line,
                column,
                key: key.into(),
                message: message.into(),
                help,
            },
        ));
    }

    /// Whether any error was recorded.
    pub(crate) fn has_errors(&self) -> bool {
        !self.errors.is_empty()
    }

    /// The number of errors recorded so far.
    pub(crate) fn len(&self) -> usize {
        self.errors.len()
    }

    /// Removes errors recorded after index `from` whose key is under one of `prefixes`.
    pub(crate) fn suppress_under(&mut self, from: usize, prefixes: &[String]) {
        let mut index = 0;
        self.errors.retain(|(_, e)| {
            let keep = index < from || !prefixes.iter().any(|p| is_under(&e.key, p));
            index += 1;
            keep
        });
    }

    /// The errors in file order.
    pub(crate) fn finish(mut self) -> Vec<ConfigError> {
        self.errors.sort_by_key(|(offset, _)| *offset);
        self.errors.into_iter().map(|(_, e)| e).collect()
    }
}

/// Whether `key` is `prefix` or a key below it (`a.b` and `a[0]` are under `a`).
pub(crate) fn is_under(key: &str, prefix: &str) -> bool {
    key == prefix
        || key
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_are_one_based_and_count_characters() {
        let text = "a = 1\nbé = \"x\"\n";
        let r = Reporter::new(Path::new("f.toml"), text, None);
        assert_eq!(r.position(0), (1, 1));
        assert_eq!(r.position(4), (1, 5));
        assert_eq!(r.position(6), (2, 1));
        // "bé" is 3 bytes; the "=" after it is at character column 4.
        assert_eq!(r.position(10), (2, 4));
        assert_eq!(r.position(text.len()), (3, 1));
    }

    #[test]
    fn display_format() {
        let e = ConfigError {
            file: "estafeta.toml".into(),
            line: 12,
            column: 11,
            key: "limits.max_message_size".into(),
            message: "invalid size \"25 megs\"".into(),
            help: Some("use a number".into()),
        };
        assert_eq!(
            e.to_string(),
            "estafeta.toml:12:11: error: limits.max_message_size: invalid size \"25 megs\"\n  help: use a number"
        );
        let e = ConfigError {
            line: 0,
            column: 0,
            key: String::new(),
            help: None,
            message: "cannot read".into(),
            ..e
        };
        assert_eq!(e.to_string(), "estafeta.toml: error: cannot read");
    }

    #[test]
    fn under() {
        assert!(is_under("tls.certificate", "tls"));
        assert!(is_under("listener[0].address", "listener[0]"));
        assert!(is_under("listener[0]", "listener"));
        assert!(!is_under("tlsx", "tls"));
    }
}
