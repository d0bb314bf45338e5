//! Reading typed values out of the YAML tree, with errors that name the file, the line and the
//! key; and the "did you mean" for unknown keys.

use super::duration;
use super::yaml::{self, Node, Value};
use crate::error::{Error, Result};
use std::time::Duration;

/// Where a value sits: the file and the key, for error messages.
pub(super) struct Ctx<'a> {
    pub(super) name: &'a str,
    pub(super) key: &'a str,
}

impl Ctx<'_> {
    pub(super) fn err(&self, line: usize, msg: String) -> Error {
        Error::tether(format!(
            "config {}:{line}: key \"{}\": {msg}",
            self.name, self.key
        ))
    }

    pub(super) fn scalar<'n>(&self, node: &'n Node) -> Result<Option<&'n str>> {
        match &node.value {
            Value::Scalar(s, quoted) if !quoted && yaml::is_null(s) => Ok(None),
            Value::Scalar(s, _) => Ok(Some(s)),
            _ => Err(self.err(node.line, format!("expected a value, got {}", node.kind()))),
        }
    }

    pub(super) fn opt_str(&self, node: &Node) -> Result<Option<String>> {
        Ok(self.scalar(node)?.map(str::to_owned))
    }

    pub(super) fn opt_duration(&self, node: &Node) -> Result<Option<Duration>> {
        match self.scalar(node)? {
            None => Ok(None),
            Some(s) => duration::parse(s)
                .map(Some)
                .map_err(|e| self.err(node.line, e)),
        }
    }

    /// `true` / `false` (YAML 1.2 core spellings), unquoted: a quoted "false" is a string, and
    /// a string where a switch belongs is a mistake worth naming.
    pub(super) fn opt_bool(&self, node: &Node) -> Result<Option<bool>> {
        if let Value::Scalar(s, false) = &node.value {
            match s.as_str() {
                "true" | "True" | "TRUE" => return Ok(Some(true)),
                "false" | "False" | "FALSE" => return Ok(Some(false)),
                _ => {}
            }
        }
        match self.scalar(node)? {
            None => Ok(None),
            Some(s) => Err(self.err(node.line, format!("expected true or false, got {s:?}"))),
        }
    }

    pub(super) fn opt_uint(&self, node: &Node) -> Result<Option<u64>> {
        match self.scalar(node)? {
            None => Ok(None),
            Some(s) => s
                .parse::<u64>()
                .map(Some)
                .map_err(|_| self.err(node.line, format!("expected a whole number, got {s:?}"))),
        }
    }

    /// A whole number that fits 32 bits: a larger one is an error, never wrapped.
    pub(super) fn opt_u32(&self, node: &Node) -> Result<Option<u32>> {
        match self.opt_uint(node)? {
            None => Ok(None),
            Some(n) => u32::try_from(n).map(Some).map_err(|_| {
                self.err(
                    node.line,
                    format!("{n} is too large (at most {})", u32::MAX),
                )
            }),
        }
    }

    pub(super) fn opt_float(&self, node: &Node) -> Result<Option<f64>> {
        match self.scalar(node)? {
            None => Ok(None),
            Some(s) => match s.parse::<f64>() {
                Ok(v) if v > 0.0 && v.is_finite() => Ok(Some(v)),
                _ => Err(self.err(node.line, format!("expected a positive number, got {s:?}"))),
            },
        }
    }

    /// `512M`, `2G`, `1048576`.
    pub(super) fn opt_bytes(&self, node: &Node) -> Result<Option<u64>> {
        let Some(s) = self.scalar(node)? else {
            return Ok(None);
        };
        let (num, mult) = match s.char_indices().last() {
            Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
            Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
            Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
            _ => (s, 1),
        };
        num.parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .map(Some)
            .ok_or_else(|| {
                self.err(
                    node.line,
                    format!("expected a size like 512M or 2G, got {s:?}"),
                )
            })
    }

    pub(super) fn map<'n>(&self, node: &'n Node) -> Result<&'n Vec<(String, usize, Node)>> {
        match &node.value {
            Value::Map(e) => Ok(e),
            _ => Err(self.err(
                node.line,
                format!("expected a mapping, got {}", node.kind()),
            )),
        }
    }

    pub(super) fn str_list(&self, node: &Node) -> Result<Vec<String>> {
        match &node.value {
            Value::Seq(items) => items
                .iter()
                .map(|i| {
                    self.scalar(i)?
                        .map(str::to_owned)
                        .ok_or_else(|| self.err(i.line, "empty list item".into()))
                })
                .collect(),
            _ => Err(self.err(node.line, format!("expected a list, got {}", node.kind()))),
        }
    }

    pub(super) fn str_map(&self, node: &Node) -> Result<Vec<(String, String)>> {
        self.map(node)?
            .iter()
            .map(|(k, l, v)| {
                if !valid_env_name(k) {
                    return Err(self.err(
                        *l,
                        format!("{k:?} is not a valid environment variable name"),
                    ));
                }
                Ok((k.clone(), self.scalar(v)?.unwrap_or("").to_owned()))
            })
            .collect()
    }
}

fn valid_env_name(k: &str) -> bool {
    !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

pub(super) fn unknown_key(key: &str, known: &[&str]) -> String {
    match known
        .iter()
        .map(|k| (levenshtein(key, k), *k))
        .filter(|(d, _)| *d <= 2)
        .min()
    {
        Some((_, k)) => format!("unknown key \"{key}\" (did you mean \"{k}\"?)"),
        None => format!("unknown key \"{key}\" (known: {})", known.join(", ")),
    }
}

pub(super) fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}
