//! Finding and removing the key a byte span points at, in the parsed TOML document.
//!
//! serde reports a deserialization error with a span but no usable key path, and stops at the
//! first error. The loader uses [`locate`] to name the key of each error, and [`remove`] to drop
//! the offending entry and deserialize again, so that every error in a file is reported.

use std::ops::Range;

use toml::Spanned;
use toml::de::{DeArray, DeTable, DeValue};

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    /// A key in a table.
    Key(String),
    /// A table in an array of tables (0-based).
    Index(usize),
}

/// Formats a path as `relay.routes."example.net"` or `domain[1].aliases.team`.
pub(crate) fn format_path(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                let bare = !key.is_empty()
                    && key
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if bare {
                    out.push_str(key);
                } else {
                    out.push_str(&format!("{key:?}"));
                }
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

fn contains(outer: &Range<usize>, inner: &Range<usize>) -> bool {
    outer.start <= inner.start && inner.end <= outer.end
}

/// The path of the deepest key whose key or value contains `span` (a key hit wins at equal
/// depth). Tables inside arrays get an index step; scalar arrays do not, so an error in one
/// element of `mynetworks` is reported at `relay.mynetworks`.
pub(crate) fn locate(root: &DeTable<'_>, span: &Range<usize>) -> Option<Vec<Seg>> {
    let mut best: Option<Vec<Seg>> = None;
    let mut path = Vec::new();
    walk_table(root, span, &mut path, &mut best);
    best
}

fn consider(path: &[Seg], best: &mut Option<Vec<Seg>>) {
    if best.as_ref().is_none_or(|b| path.len() > b.len()) {
        *best = Some(path.to_vec());
    }
}

fn walk_table(
    table: &DeTable<'_>,
    span: &Range<usize>,
    path: &mut Vec<Seg>,
    best: &mut Option<Vec<Seg>>,
) {
    for (key, value) in table.iter() {
        path.push(Seg::Key(key.get_ref().to_string()));
        let key_span = key.span();
        let key_hit =
            contains(&key_span, span) || (key_span.start == span.start && !key_span.is_empty());
        if key_hit || contains(&value.span(), span) {
            consider(path, best);
        }
        walk_value(value, span, path, best);
        path.pop();
    }
}

fn walk_value(
    value: &Spanned<DeValue<'_>>,
    span: &Range<usize>,
    path: &mut Vec<Seg>,
    best: &mut Option<Vec<Seg>>,
) {
    match value.get_ref() {
        DeValue::Table(table) => walk_table(table, span, path, best),
        DeValue::Array(array) => walk_array(array, span, path, best),
        _ => {}
    }
}

fn walk_array(
    array: &DeArray<'_>,
    span: &Range<usize>,
    path: &mut Vec<Seg>,
    best: &mut Option<Vec<Seg>>,
) {
    for (i, item) in array.iter().enumerate() {
        if let DeValue::Table(table) = item.get_ref() {
            path.push(Seg::Index(i));
            if contains(&item.span(), span) {
                consider(path, best);
            }
            walk_table(table, span, path, best);
            path.pop();
        }
    }
}

/// Removes the entry (or array-of-tables element) that [`locate`] finds for `span`. Returns
/// false when nothing was found.
pub(crate) fn remove(root: &mut DeTable<'_>, span: &Range<usize>) -> bool {
    let Some(path) = locate(root, span) else {
        return false;
    };
    remove_in_table(root, &path)
}

fn remove_in_table(table: &mut DeTable<'_>, path: &[Seg]) -> bool {
    match path {
        [Seg::Key(key)] => table.remove(key.as_str()).is_some(),
        [Seg::Key(key), rest @ ..] => match table.get_mut(key.as_str()).map(|v| v.get_mut()) {
            Some(DeValue::Table(t)) => remove_in_table(t, rest),
            Some(DeValue::Array(a)) => remove_in_array(a, rest),
            _ => false,
        },
        _ => false,
    }
}

fn remove_in_array(array: &mut DeArray<'_>, path: &[Seg]) -> bool {
    match path {
        [Seg::Index(i)] if *i < array.len() => {
            let kept: DeArray<'_> = array
                .iter()
                .enumerate()
                .filter(|(j, _)| j != i)
                .map(|(_, v)| v.clone())
                .collect();
            *array = kept;
            true
        }
        [Seg::Index(i), rest @ ..] => match array.get_mut(*i).map(|v| v.get_mut()) {
            Some(DeValue::Table(t)) => remove_in_table(t, rest),
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span_of(text: &str, needle: &str) -> Range<usize> {
        let start = text.find(needle).unwrap();
        start..start + needle.len()
    }

    const DOC: &str = r#"
hostname = "a"
[relay]
mynetworks = ["10.0.0.0/8", "x"]
[relay.routes]
"example.net" = "[192.0.2.7]:25"
[[domain]]
name = "a.example"
[[domain]]
name = "b.example"
[domain.aliases]
team = ["x", "y"]
"#;

    #[test]
    fn locates_keys_and_values() {
        let root = DeTable::parse(DOC).unwrap().into_inner();
        let at = |needle: &str| format_path(&locate(&root, &span_of(DOC, needle)).unwrap());
        assert_eq!(at("hostname"), "hostname");
        assert_eq!(at("\"a\""), "hostname");
        assert_eq!(at("\"x\""), "relay.mynetworks");
        assert_eq!(at("\"[192.0.2.7]:25\""), "relay.routes.\"example.net\"");
        assert_eq!(at("\"b.example\""), "domain[1].name");
        assert_eq!(at("team"), "domain[1].aliases.team");
    }

    #[test]
    fn removes_entries() {
        let mut root = DeTable::parse(DOC).unwrap().into_inner();
        assert!(remove(&mut root, &span_of(DOC, "\"b.example\"")));
        let domains = root.get("domain").unwrap().get_ref().as_array().unwrap();
        assert!(
            domains[1]
                .get_ref()
                .as_table()
                .unwrap()
                .get("name")
                .is_none()
        );
        assert!(remove(&mut root, &span_of(DOC, "hostname")));
        assert!(root.get("hostname").is_none());
    }
}
