//! Reading: `yaml-rust2`'s parser events into one [`Value`] tree, the way PyYAML's
//! `safe_load` composes them. This file owns the document structure — collections,
//! anchors and aliases, the `<<` merge key, duplicate keys (the later wins), one document
//! per stream — and leaves what a scalar *means* to `resolve.rs`, so the two PyYAML rule
//! sets (composer and resolver) can be checked against PyYAML separately.

use std::collections::HashMap;

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use super::resolve::{check_collection_tag, scalar};
use super::{Value, YamlError};

/// Parse one YAML document the way PyYAML's `safe_load` does. `Ok(None)` for an empty
/// stream (PyYAML returns `None`).
pub fn parse(text: &str) -> Result<Option<Value>, YamlError> {
    let mut builder = Builder::default();
    let mut parser = Parser::new_from_str(text);
    parser
        .load(&mut builder, true)
        .map_err(|e| YamlError::Syntax {
            line: e.marker().line(),
            col: e.marker().col() + 1,
            msg: e.info().to_string(),
        })?;
    if let Some(err) = builder.error {
        return Err(err);
    }
    match builder.docs.len() {
        0 => Ok(None),
        1 => Ok(builder.docs.pop()),
        n => Err(YamlError::MultipleDocuments(n)),
    }
}

/// Builds [`Value`]s from parser events, resolving plain scalars as PyYAML does.
#[derive(Default)]
struct Builder {
    docs: Vec<Value>,
    stack: Vec<OpenCollection>,
    anchors: HashMap<usize, Value>,
    error: Option<YamlError>,
}

/// A collection whose end event has not come yet.
struct OpenCollection {
    node: Value,
    anchor: usize,
    /// For a mapping: the key waiting for its value, and whether it is the plain `<<`.
    pending_key: Option<(Value, bool)>,
}

impl Builder {
    fn push_node(
        &mut self,
        node: Value,
        anchor: usize,
        is_merge: bool,
        line: usize,
    ) -> Result<(), YamlError> {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        let Some(OpenCollection {
            node: parent,
            pending_key,
            ..
        }) = self.stack.last_mut()
        else {
            self.docs.push(node);
            return Ok(());
        };
        match parent {
            Value::Seq(items) => items.push(node),
            Value::Map(entries) => match pending_key.take() {
                None => {
                    if matches!(node, Value::Seq(_) | Value::Map(_)) {
                        return Err(YamlError::BadKey {
                            found: node.kind(),
                            line,
                        });
                    }
                    *pending_key = Some((node, is_merge));
                }
                Some((_, true)) => merge_into(entries, node, line)?,
                Some((key, false)) => insert_entry(entries, key, node),
            },
            _ => unreachable!("only collections are pushed on the stack"),
        }
        Ok(())
    }

    fn handle(&mut self, ev: Event, mark: Marker) -> Result<(), YamlError> {
        let line = mark.line();
        match ev {
            Event::Scalar(text, style, anchor, tag) => {
                let is_merge = style == TScalarStyle::Plain && tag.is_none() && text == "<<";
                let node = scalar(text, style, tag.as_ref(), line)?;
                self.push_node(node, anchor, is_merge, line)?;
            }
            Event::Alias(id) => {
                let node = self
                    .anchors
                    .get(&id)
                    .cloned()
                    .ok_or(YamlError::UnknownAlias { line })?;
                self.push_node(node, 0, false, line)?;
            }
            Event::SequenceStart(anchor, tag) => {
                check_collection_tag(tag.as_ref(), "seq", line)?;
                self.stack.push(OpenCollection {
                    node: Value::Seq(Vec::new()),
                    anchor,
                    pending_key: None,
                });
            }
            Event::MappingStart(anchor, tag) => {
                check_collection_tag(tag.as_ref(), "map", line)?;
                self.stack.push(OpenCollection {
                    node: Value::Map(Vec::new()),
                    anchor,
                    pending_key: None,
                });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let open = self.stack.pop().expect("balanced events");
                let (node, anchor) = (open.node, open.anchor);
                self.push_node(node, anchor, false, line)?;
            }
            Event::Nothing
            | Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd => {}
        }
        Ok(())
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        if self.error.is_none() {
            if let Err(e) = self.handle(ev, mark) {
                self.error = Some(e);
            }
        }
    }
}

/// A duplicate key replaces the earlier value, as in PyYAML.
fn insert_entry(entries: &mut Vec<(Value, Value)>, key: Value, value: Value) {
    match entries.iter_mut().find(|(k, _)| *k == key) {
        Some(slot) => slot.1 = value,
        None => entries.push((key, value)),
    }
}

/// The `<<` merge key: merge a mapping (or a list of them) in; keys already present win.
fn merge_into(
    entries: &mut Vec<(Value, Value)>,
    value: Value,
    line: usize,
) -> Result<(), YamlError> {
    let sources = match value {
        Value::Map(m) => vec![m],
        Value::Seq(items) => items
            .into_iter()
            .map(|v| match v {
                Value::Map(m) => Ok(m),
                other => Err(other),
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|other| YamlError::BadMerge {
                found: other.kind(),
                line,
            })?,
        other => {
            return Err(YamlError::BadMerge {
                found: other.kind(),
                line,
            })
        }
    };
    for (k, v) in sources.into_iter().flatten() {
        if !entries.iter().any(|(existing, _)| *existing == k) {
            entries.push((k, v));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_documents() {
        let v = parse("a: &x {b: 1}\nc: *x\nd:\n  <<: *x\n  e: 'yes'\n")
            .unwrap()
            .unwrap();
        assert_eq!(v.get("c"), v.get("a"));
        let d = v.get("d").unwrap();
        assert_eq!(d.get("b"), Some(&Value::Int(1)));
        assert_eq!(d.get("e"), Some(&Value::Str("yes".into())));
        assert_eq!(parse("").unwrap(), None);
        assert_eq!(parse("# only a comment\n").unwrap(), None);
        assert!(matches!(
            parse("a: [").unwrap_err(),
            YamlError::Syntax { .. }
        ));
        assert!(matches!(
            parse("a\n---\nb\n").unwrap_err(),
            YamlError::MultipleDocuments(2)
        ));
        assert_eq!(parse("!!str 12").unwrap(), Some(Value::Str("12".into())));
        assert_eq!(
            parse("k: v\nk: w\n").unwrap().unwrap().get("k"),
            Some(&Value::Str("w".into()))
        );
    }
}
