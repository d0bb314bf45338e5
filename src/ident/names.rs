//! App domains and run ids: validated before any file is touched (CLI-CONTRACT §3).
//!
//! Both end up in file names (`app-<domain>.lock`, `<runs dir>/<run-id>/`), so anything that
//! could climb out of a directory (`..`, `/`, NUL) or confuse a reader is refused here, once.

use std::fmt;

/// A valid, lowercase DNS name: labels of `[a-z0-9-]`, 1–63 chars, no leading/trailing `-`,
/// joined by single dots, 1–253 chars in all.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct Domain(String);

impl Domain {
    pub(crate) fn parse(text: &str) -> Result<Domain, String> {
        let lower = text.to_ascii_lowercase();
        let why = domain_problem(&lower);
        match why {
            None => Ok(Domain(lower)),
            Some(why) => Err(format!("invalid app domain {text:?}: {why}")),
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

fn domain_problem(d: &str) -> Option<&'static str> {
    if d.is_empty() {
        return Some("empty");
    }
    if d.len() > 253 {
        return Some("longer than 253 characters");
    }
    for label in d.split('.') {
        if label.is_empty() {
            return Some("empty label (leading, trailing or double dot)");
        }
        if label.len() > 63 {
            return Some("a label is longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Some("only letters, digits, '-' and '.' are allowed");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some("a label starts or ends with '-'");
        }
    }
    None
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A run id: `[A-Za-z0-9._-]`, 1–128 chars, not starting with `.`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct RunId(String);

impl RunId {
    pub(crate) fn parse(text: &str) -> Result<RunId, String> {
        let why = if text.is_empty() {
            Some("empty")
        } else if text.len() > 128 {
            Some("longer than 128 characters")
        } else if text.starts_with('.') {
            Some("starts with '.'")
        } else if !text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            Some("only letters, digits, '.', '_' and '-' are allowed")
        } else {
            None
        };
        match why {
            None => Ok(RunId(text.to_owned())),
            Some(why) => Err(format!("invalid run id {text:?}: {why}")),
        }
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_are_normalized_and_checked() {
        assert_eq!(
            Domain::parse("Immi-AD3E33.ci.Example.org").map(|d| d.0),
            Ok("immi-ad3e33.ci.example.org".to_string())
        );
        assert!(Domain::parse("localhost").is_ok());
        assert!(Domain::parse(&format!("{}.org", "a".repeat(63))).is_ok());
        for bad in [
            "", "../x", "a/b", "a..b", ".a", "a.", "a b", "a\0b", "-a.org", "a-.org", "ä.org",
        ] {
            assert!(Domain::parse(bad).is_err(), "{bad:?} accepted");
        }
        assert!(Domain::parse(&format!("{}.org", "a".repeat(64))).is_err());
        let long = vec!["abcdefghi"; 26].join(".");
        assert!(long.len() > 253);
        assert!(Domain::parse(&long).is_err());
    }

    #[test]
    fn run_ids_are_checked() {
        for good in ["267", "drone-org-repo-12-1.2", "a_b.c-D", &"x".repeat(128)] {
            assert!(RunId::parse(good).is_ok(), "{good:?} refused");
        }
        for bad in ["", ".hidden", "a/b", "..", "a b", "a\0", &"x".repeat(129)] {
            let err = RunId::parse(bad).expect_err(bad);
            assert!(err.contains("invalid run id"), "{err}");
        }
    }
}
