//! `config`: TOML text through lb's config loader ([`lb_bin::check_config`], the code path of
//! `lb --config FILE`).
//!
//! Invariants (SPEC.md, "Config file"):
//! 1. no text makes the loader panic;
//! 2. a refused file is named in the error, which says where: a file that is not TOML names
//!    its line; a TOML file refused for a key names the key (and shows it), and its line
//!    whenever the key is in the file, a line that holds that key;
//! 3. an accepted file is accepted again, with the same settings, when loaded a second time
//!    and when written back out as TOML by another writer (so no setting depends on the
//!    file's layout).

use std::path::Path;

use lb_bin::{check_config, ConfigProblem};

/// The name the harness gives every config file.
pub const FILE: &str = "/etc/lb/fuzz.toml";

/// The fuzz target: `data` as the config file's text (lossily, as UTF-8: `lb` refuses
/// other files before parsing them); panics only on a broken invariant.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    check(&text);
}

/// Loads `text` and checks every invariant.
///
/// # Panics
/// When an invariant is broken (the message says which).
pub fn check(text: &str) {
    let file = Path::new(FILE);
    let table = text.parse::<toml::Table>();
    match check_config(file, text) {
        Err(e) => check_problem(text, table.as_ref().ok(), &e),
        Ok(first) => {
            let again = check_config(file, text);
            assert_eq!(again.as_ref(), Ok(&first), "invariant 3: loaded twice");
            let table = table
                .unwrap_or_else(|e| panic!("invariant 3: lb accepted text that is not TOML: {e}"));
            let rewritten = toml::to_string(&table).expect("a parsed table serializes");
            let other = check_config(file, &rewritten);
            assert_eq!(
                other.as_ref().map(|c| &c.settings),
                Ok(&first.settings),
                "invariant 3: the same config written out again:\n{rewritten}"
            );
        }
    }
}

fn check_problem(text: &str, table: Option<&toml::Table>, e: &ConfigProblem) {
    assert_eq!(
        e.file.as_deref(),
        Some(Path::new(FILE)),
        "invariant 2: the error names the file: {e:?}"
    );
    assert!(
        e.shown.starts_with(FILE),
        "invariant 2: the message starts with the file: {e:?}"
    );
    let lines = text.split('\n').count();
    if let Some(l) = e.line {
        assert!((1..=lines).contains(&l), "invariant 2: line {l} of {lines}");
    }
    let Some(table) = table else {
        assert!(
            e.line.is_some(),
            "invariant 2: a TOML error names its line: {e:?}"
        );
        return;
    };
    assert!(
        !e.key.is_empty(),
        "invariant 2: the error names the key: {e:?}"
    );
    assert!(
        e.shown.contains(&e.key),
        "invariant 2: the message shows the key: {e:?}"
    );
    if let Some(leaf) = lookup(table, &e.key) {
        let l = e
            .line
            .unwrap_or_else(|| panic!("invariant 2: `{}` is in the file: its line: {e:?}", e.key));
        let at = text.split('\n').nth(l - 1).unwrap_or_default();
        assert!(
            at.contains(leaf),
            "invariant 2: line {l} ({at:?}) holds `{leaf}`: {e:?}"
        );
    }
}

/// The last name of `key` (`backend[1].url`: `url`) if `key` is in `table`.
fn lookup<'k>(table: &toml::Table, key: &'k str) -> Option<&'k str> {
    let mut value: Option<&toml::Value> = None;
    let mut leaf = None;
    for part in key.split('.') {
        let (name, index) = match part.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        let t = match value {
            None => table,
            Some(v) => v.as_table()?,
        };
        let mut v = t.get(name)?;
        if let Some(i) = index {
            v = v.as_array()?.get(i)?;
        }
        value = Some(v);
        leaf = Some(name);
    }
    leaf
}
