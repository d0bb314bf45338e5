//! A small YAML tree with line numbers, built from `yaml-rust2`'s event parser.
//!
//! The config loader needs to say *where* a problem is (`config <file>:<line>: unknown key
//! "teardwon"`), which the crate's own document type forgets; so this keeps each node's line.
//! Anchors and aliases are refused: a config file has no use for them and they make line
//! numbers ambiguous.

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Value {
    /// A scalar with whether it was quoted (quoted scalars are always strings).
    Scalar(String, bool),
    Seq(Vec<Node>),
    /// Keys with their own line, in file order.
    Map(Vec<(String, usize, Node)>),
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Node {
    pub(crate) line: usize,
    pub(crate) value: Value,
}

impl Node {
    pub(crate) fn kind(&self) -> &'static str {
        match &self.value {
            Value::Scalar(s, false) if is_null(s) => "null",
            Value::Scalar(..) => "a scalar",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

pub(crate) fn is_null(s: &str) -> bool {
    matches!(s, "" | "~" | "null" | "Null" | "NULL")
}

enum Frame {
    Seq(usize, Vec<Node>),
    Map(usize, Vec<(String, usize, Node)>, Option<(String, usize)>),
}

#[derive(Default)]
struct Builder {
    stack: Vec<Frame>,
    root: Option<Node>,
    error: Option<(usize, String)>,
    documents: usize,
}

impl Builder {
    fn push_node(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Frame::Seq(_, items)) => items.push(node),
            Some(Frame::Map(_, entries, pending)) => match pending.take() {
                None => match node.value {
                    Value::Scalar(key, _) => *pending = Some((key, node.line)),
                    _ => {
                        self.error.get_or_insert((
                            node.line,
                            "mapping keys must be plain strings".into(),
                        ));
                    }
                },
                Some((key, line)) => entries.push((key, line, node)),
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line();
        match ev {
            Event::Scalar(text, style, _, _) => {
                let quoted = !matches!(style, TScalarStyle::Plain);
                self.push_node(Node {
                    line,
                    value: Value::Scalar(text, quoted),
                });
            }
            Event::SequenceStart(..) => self.stack.push(Frame::Seq(line, Vec::new())),
            Event::MappingStart(..) => self.stack.push(Frame::Map(line, Vec::new(), None)),
            Event::SequenceEnd | Event::MappingEnd => {
                let node = match self.stack.pop() {
                    Some(Frame::Seq(l, items)) => Node {
                        line: l,
                        value: Value::Seq(items),
                    },
                    Some(Frame::Map(l, entries, _)) => Node {
                        line: l,
                        value: Value::Map(entries),
                    },
                    None => return,
                };
                self.push_node(node);
            }
            Event::Alias(_) => {
                self.error
                    .get_or_insert((line, "anchors and aliases are not supported".into()));
            }
            // A second document would be silently ignored by a one-document load.
            Event::DocumentStart => {
                self.documents += 1;
                if self.documents > 1 {
                    self.error.get_or_insert((
                        line,
                        "a second YAML document starts here (---); tether reads one".into(),
                    ));
                }
            }
            _ => {}
        }
    }
}

/// Parse one YAML document. `Ok(None)` for an empty file (or a lone `---`). A leading byte
/// order mark is allowed, as YAML allows it; a second document is an error. Errors carry a
/// 1-based line.
pub(crate) fn parse(text: &str) -> Result<Option<Node>, (usize, String)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut b = Builder::default();
    let mut parser = Parser::new_from_str(text);
    parser
        .load(&mut b, true)
        .map_err(|e| blame_tab(text, e.marker().line(), e.info()))?;
    if let Some(err) = b.error {
        return Err(err);
    }
    // `---` alone is an empty document: the parser hands it over as a null scalar.
    Ok(b.root
        .filter(|n| !matches!(&n.value, Value::Scalar(t, false) if t == "~" || t.is_empty())))
}

/// A tab where YAML wants spaces makes the parser stop at the line *before* it now and then
/// (a plain scalar runs on into the next line), with a message about the scalar. When the
/// error's line or the next one has a tab outside quotes, name that line and the tab.
fn blame_tab(text: &str, line: usize, msg: &str) -> (usize, String) {
    let unquoted_tab = |l: &str| {
        let before_quote = l.split(['"', '\'']).next().unwrap_or(l);
        before_quote.find('\t')
    };
    for n in [line, line + 1] {
        let Some(l) = n.checked_sub(1).and_then(|i| text.lines().nth(i)) else {
            continue;
        };
        if let Some(col) = unquoted_tab(l) {
            let msg = format!(
                "a tab at column {}: YAML indents and separates with spaces ({msg})",
                col + 1
            );
            return (n, msg);
        }
    }
    (line, msg.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_document_a_bom_and_a_lone_marker() {
        assert!(parse("---\n").expect("a lone ---").is_none());
        assert!(parse("").expect("empty").is_none());
        let n = parse("\u{feff}a: 1\n").expect("a BOM is allowed");
        assert!(matches!(n, Some(Node { value: Value::Map(ref e), .. }) if e[0].0 == "a"));
        let (line, msg) = parse("a: 1\n---\nb: 2\n").expect_err("two documents");
        assert_eq!(line, 2, "{msg}");
        assert!(msg.contains("second YAML document"), "{msg}");
        assert!(parse("---\na: 1\n")
            .expect("one explicit document")
            .is_some());
    }

    #[test]
    fn keeps_lines_and_quoting() {
        let n = parse("a: 1\nb:\n  - x\n  - 'y'\nc: {d: e}\n")
            .expect("parses")
            .expect("not empty");
        let Value::Map(entries) = n.value else {
            panic!("not a map")
        };
        assert_eq!(entries[0].0, "a");
        assert_eq!(entries[0].1, 1);
        assert_eq!(entries[1].1, 2);
        let Value::Seq(items) = &entries[1].2.value else {
            panic!("not a seq")
        };
        assert_eq!(items[1].value, Value::Scalar("y".into(), true));
        assert_eq!(items[1].line, 4);
        assert_eq!(entries[2].1, 5);
    }

    #[test]
    fn a_tab_is_named_at_its_own_line() {
        for (text, line) in [
            ("deadline: 10m\n\tgrace: 5s\n", 2),
            ("deadline: 10m\nenv:\n  allow:\n\t- A\n", 4),
            ("deadline:\t10m\n", 1),
        ] {
            let (at, msg) = parse(text).expect_err("a tab");
            assert_eq!(at, line, "{text:?}: {msg}");
            assert!(msg.starts_with("a tab at column "), "{msg}");
        }
        // A tab inside quotes is text, not indentation: the parser's own message stands.
        let (_, msg) = parse("a: \"x\ty\"\nb: [\n").expect_err("unclosed");
        assert!(!msg.contains("a tab at"), "{msg}");
    }

    #[test]
    fn reports_syntax_errors_with_a_line() {
        let err = parse("a: 1\nb: [unclosed\n").expect_err("bad yaml");
        assert!(err.0 >= 2, "{err:?}");
        assert!(parse("").expect("empty ok").is_none());
        assert!(parse("a: &x 1\nb: *x\n").is_err());
    }
}
