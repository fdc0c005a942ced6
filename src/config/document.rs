//! A YAML document as a JSON value plus the position of every node.
//!
//! The loader turns the text into this first, so that every later step (environment interpolation,
//! typed deserialization, a JSON Schema check) can report an error at the line and column of the
//! node it concerns, by its path (`routes[0].retry.backoff.initial`).

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use super::interpolate::{Interpolator, Missing};

/// A line and column in the config file, both counted from 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

impl From<Marker> for Position {
    fn from(m: Marker) -> Self {
        // yaml-rust2 counts lines from 1 and columns from 0.
        Position {
            line: m.line(),
            column: m.col() + 1,
        }
    }
}

/// `text` with each occurrence of `word` that no letter or digit touches replaced by `with`.
fn replace_standalone(text: &str, word: &str, with: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    let mut before: Option<char> = None;
    while let Some(i) = rest.find(word) {
        let prev = rest[..i].chars().next_back().or(before);
        let next = rest[i + word.len()..].chars().next();
        let alone = !prev.is_some_and(char::is_alphanumeric) && !next.is_some_and(char::is_alphanumeric);
        out.push_str(&rest[..i]);
        out.push_str(if alone { with } else { word });
        before = word.chars().next_back();
        rest = &rest[i + word.len()..];
    }
    out.push_str(rest);
    out
}

/// A problem found while reading the document, before any typing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DocumentError {
    pub position: Position,
    pub path: String,
    pub message: String,
}

/// Whether the value at path `inner` is the one at `outer` or part of it (`routes[0]` holds
/// `routes[0].call` and `routes[0][1]`, not `routes[0]x`); the root holds everything.
pub(crate) fn within(outer: &str, inner: &str) -> bool {
    outer.is_empty()
        || inner == outer
        || inner
            .strip_prefix(outer)
            .is_some_and(|rest| rest.starts_with(['.', '[']))
}

/// The parsed, interpolated document.
pub struct Document {
    pub value: Value,
    /// Position of each node's value, by path. The root is `""`.
    values: HashMap<String, Position>,
    /// Position of each mapping key, by the path of the value it introduces.
    keys: HashMap<String, Position>,
    /// Paths of the scalar values that held at least one `${…}` reference.
    referenced: HashSet<String>,
    /// What references brought in from the environment or files: the path of the value each
    /// went into, the text, and the reference (`${KAFKA_PASSWORD}`) to show in its place.
    outside: Vec<(String, String, String)>,
    /// The scalars that hold a missing variable's placeholder (`--env-optional`): the path and
    /// the JSON pointer of each.
    placeholders: Vec<(String, String)>,
    /// The JSON pointer of each node, by path.
    pointers: HashMap<String, String>,
}

/// The values may hold credentials: debug output shows none of them.
impl std::fmt::Debug for Document {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Document")
            .field("nodes", &self.values.len())
            .finish_non_exhaustive()
    }
}

impl Document {
    /// Parses `text` and interpolates `${…}` references in scalar values. Every error found is
    /// returned, not just the first.
    pub fn parse(text: &str, interpolator: &Interpolator) -> Result<Document, Vec<DocumentError>> {
        let mut builder = Builder::default();
        let mut parser = Parser::new_from_str(text);
        if let Err(e) = parser.load(&mut builder, false) {
            let position: Position = (*e.marker()).into();
            // YAML reads the braces of `${…}` as its own inside `{ … }` and `[ … ]`, and a quoted
            // reference is a string, not the number it may stand for: block style says it.
            let line = text
                .lines()
                .nth(position.line.saturating_sub(1))
                .unwrap_or_default();
            let hint = if line.contains("${") && (line.contains('{') || line.contains('[')) {
                "; a `${…}` reference inside `{ … }` or `[ … ]` ends it early: write that mapping in block style, one key per line (`max_attempts: ${N:-5}` on a line of its own)"
            } else {
                ""
            };
            return Err(vec![DocumentError {
                position,
                path: String::new(),
                message: format!("this is not valid YAML: {}{hint}", e.info()),
            }]);
        }
        let Some(root) = builder.root else {
            return Err(vec![DocumentError {
                position: Position { line: 1, column: 1 },
                path: String::new(),
                message: "the file is empty; it needs at least `kafka` and `routes`".into(),
            }]);
        };
        let mut doc = Document {
            value: Value::Null,
            values: HashMap::new(),
            keys: HashMap::new(),
            referenced: HashSet::new(),
            outside: Vec::new(),
            placeholders: Vec::new(),
            pointers: HashMap::new(),
        };
        let mut errors = builder.errors;
        doc.value = doc.convert(root, String::new(), String::new(), interpolator, &mut errors);
        if errors.is_empty() { Ok(doc) } else { Err(errors) }
    }

    /// The position of the node at `path`, or of its nearest ancestor that has one.
    pub fn position(&self, path: &str) -> Position {
        let mut p = path;
        loop {
            if let Some(pos) = self.values.get(p) {
                return *pos;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return self.values.get("").copied().unwrap_or_default(),
            }
        }
    }

    /// Whether the scalar at `path` was written with a `${…}` reference.
    pub fn is_referenced(&self, path: &str) -> bool {
        self.referenced.contains(path)
    }

    /// `message`, about the value at `path`, with every value that came from the environment
    /// or a file into that value (or one within it, or the one it is within) replaced by the
    /// reference that brought it (`${KAFKA_PASSWORD}`): an error may quote a value, never a
    /// secret. Only those: a message about another field quotes that field, and masking a
    /// password wherever its text happens to occur (a path segment `kafka`, say) garbled the
    /// message and showed what the password was. Values shorter than four characters are
    /// replaced only where they stand alone, so that a `${PARTITIONS}` of `3` does not turn
    /// every 3 in the message into a reference.
    pub fn redact(&self, path: &str, message: &str) -> String {
        let related = |at: &str| within(path, at) || within(at, path);
        let mut outside: Vec<(&String, &String)> = self
            .outside
            .iter()
            .filter(|(at, _, _)| related(at))
            .map(|(_, value, reference)| (value, reference))
            .collect();
        outside.sort_by_key(|(value, _)| std::cmp::Reverse(value.len()));
        let mut out = message.to_string();
        for (value, reference) in outside {
            if value.len() >= 4 {
                out = out.replace(value.as_str(), reference);
            } else {
                out = replace_standalone(&out, value, reference);
            }
        }
        out
    }

    /// Gives each missing variable's placeholder (`--env-optional`) a value of the type its
    /// field takes, so that the rest of the file is checked as it will be in production: the
    /// first of a few stand-ins (the placeholder itself, a number, a duration, a boolean, then
    /// `more` of the field's path: the values of its set, an address) that neither the schema
    /// nor the typed parse refuses there. Returns the paths of the
    /// placeholders, whose values cannot be checked without their variables.
    pub fn stand_in_placeholders(
        &mut self,
        more: impl Fn(&str) -> Vec<Value>,
        fits: impl Fn(&Value, &str) -> bool,
    ) -> HashSet<String> {
        let general = [
            Value::from(1),
            Value::from("1s"),
            Value::from(true),
            Value::from(0.5),
        ];
        // The typed parse stops at its first error, which may be another placeholder's: what
        // looked fine behind it is looked at again once that one has its stand-in.
        for _ in 0..=self.placeholders.len() {
            let mut changed = false;
            for (path, pointer) in &self.placeholders {
                if fits(&self.value, path) {
                    continue;
                }
                let Some(original) = self.value.pointer(pointer).cloned() else {
                    continue;
                };
                let mut fitted = false;
                for stand_in in general.iter().cloned().chain(more(path)) {
                    if let Some(v) = self.value.pointer_mut(pointer) {
                        *v = stand_in;
                    }
                    if fits(&self.value, path) {
                        fitted = true;
                        break;
                    }
                }
                changed |= fitted;
                // None fits: the placeholder stays, and the error says what the field wants.
                if !fitted && let Some(v) = self.value.pointer_mut(pointer) {
                    *v = original;
                }
            }
            if !changed {
                break;
            }
        }
        self.placeholders.iter().map(|(path, _)| path.clone()).collect()
    }

    /// The value without the mapping entries at `paths`: what is left to check once those
    /// are fixed. `None` when one of them is not a mapping entry (an array item: taking it out
    /// would move the items after it to other paths).
    pub fn without(&self, paths: &[&str]) -> Option<Value> {
        let mut value = self.value.clone();
        for path in paths {
            let pointer = self.pointers.get(*path)?;
            let (parent, key) = pointer.rsplit_once('/')?;
            let key = key.replace("~1", "/").replace("~0", "~");
            value.pointer_mut(parent)?.as_object_mut()?.remove(&key);
        }
        Some(value)
    }

    /// The position of the key that introduces `path`, if it is a mapping entry.
    pub fn key_position(&self, path: &str) -> Option<Position> {
        self.keys.get(path).copied()
    }

    fn convert(
        &mut self,
        node: Node,
        path: String,
        pointer: String,
        interp: &Interpolator,
        errors: &mut Vec<DocumentError>,
    ) -> Value {
        // A merged mapping (`<<: *defaults`) stands at its parent's path: the parent keeps its
        // own position.
        self.values.entry(path.clone()).or_insert(node.position);
        self.pointers
            .entry(path.clone())
            .or_insert_with(|| pointer.clone());
        match node.kind {
            NodeKind::Scalar(text, style) => {
                let text = match interp.expand_tracked(&text) {
                    Ok(e) => {
                        if e.references > 0 {
                            self.referenced.insert(path.clone());
                        }
                        if e.placeholders > 0 {
                            self.placeholders.push((path.clone(), pointer.clone()));
                        }
                        self.outside
                            .extend(e.fragments.into_iter().map(|(v, r)| (path.clone(), v, r)));
                        e.text
                    }
                    Err(missing) => {
                        errors.push(DocumentError {
                            position: node.position,
                            path: path.clone(),
                            message: missing_message(&missing),
                        });
                        return Value::Null;
                    }
                };
                if style == TScalarStyle::Plain {
                    resolve_plain(&text)
                } else {
                    Value::String(text)
                }
            }
            NodeKind::Sequence(items) => Value::Array(
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, item)| {
                        let pointer = format!("{pointer}/{i}");
                        self.convert(item, format!("{path}[{i}]"), pointer, interp, errors)
                    })
                    .collect(),
            ),
            NodeKind::Mapping(entries) => {
                let mut map = Map::new();
                // YAML's merge keys (`<<: *defaults`, `<<: [*a, *b]`): the mappings' entries
                // join this one where it has no entry of its own, the first given first. They
                // are read after its own entries, so that those keep their positions.
                let mut merges = Vec::new();
                for (key, key_pos, value) in entries {
                    if key == "<<" {
                        merges.push(value);
                        continue;
                    }
                    let child = if path.is_empty() {
                        key.clone()
                    } else {
                        format!("{path}.{key}")
                    };
                    if map.contains_key(&key) {
                        errors.push(DocumentError {
                            position: key_pos,
                            path: child,
                            message: format!("`{key}` is given twice in the same mapping; keep one"),
                        });
                        continue;
                    }
                    self.keys.insert(child.clone(), key_pos);
                    let pointer = format!("{pointer}/{}", key.replace('~', "~0").replace('/', "~1"));
                    let v = self.convert(value, child, pointer, interp, errors);
                    map.insert(key, v);
                }
                for value in merges {
                    // `<<: [*a, *b]`: each item merges at this mapping's own path, not as an
                    // item of a list that is not in the document.
                    let nodes = match value.kind {
                        NodeKind::Sequence(items) => items,
                        kind => vec![Node {
                            position: value.position,
                            kind,
                        }],
                    };
                    for mut node in nodes {
                        let position = node.position;
                        // What this mapping already has is not read from the merged one at
                        // all: its position, placeholders and secrets are the mapping's own.
                        if let NodeKind::Mapping(entries) = &mut node.kind {
                            entries.retain(|(key, _, _)| key == "<<" || !map.contains_key(key));
                        }
                        match self.convert(node, path.clone(), pointer.clone(), interp, errors) {
                            Value::Object(m) => {
                                for (k, v) in m {
                                    map.entry(k).or_insert(v);
                                }
                            }
                            _ => errors.push(DocumentError {
                                position,
                                path: path.clone(),
                                message: "a merge key `<<` takes a mapping (`<<: *defaults`) or a list of them (`<<: [*a, *b]`)".into(),
                            }),
                        }
                    }
                }
                Value::Object(map)
            }
        }
    }
}

fn missing_message(missing: &Missing) -> String {
    match missing {
        Missing::Variable(name) => format!(
            "environment variable {name} is not set and has no default: set it, or write ${{{name}:-default}}"
        ),
        Missing::File { path, error } => {
            format!("cannot read ${{file:{path}}}: {error}")
        }
        Missing::Syntax(text) => format!(
            "`{text}` is not a valid reference: use ${{VAR}}, ${{VAR:-default}} or ${{file:/path}} (write $${{ for a literal ${{)"
        ),
    }
}

/// YAML 1.2 core schema resolution of a plain scalar.
fn resolve_plain(text: &str) -> Value {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Ok(i) = text.parse::<i64>() {
        return Value::Number(i.into());
    }
    let looks_numeric = text
        .chars()
        .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+' | 'e' | 'E'));
    if looks_numeric && text.chars().any(|c| c.is_ascii_digit()) {
        if let Some(n) = text.parse::<f64>().ok().and_then(Number::from_f64) {
            return Value::Number(n);
        }
    }
    Value::String(text.to_string())
}

#[derive(Debug, Clone)]
struct Node {
    position: Position,
    kind: NodeKind,
}

#[derive(Debug, Clone)]
enum NodeKind {
    Scalar(String, TScalarStyle),
    Sequence(Vec<Node>),
    /// Entries keep their order; duplicates are reported during conversion.
    Mapping(Vec<(String, Position, Node)>),
}

/// Builds the node tree from parser events, resolving aliases to their anchored node.
#[derive(Default)]
struct Builder {
    stack: Vec<Partial>,
    anchors: HashMap<usize, Node>,
    root: Option<Node>,
    errors: Vec<DocumentError>,
}

enum Partial {
    Sequence(Position, usize, Vec<Node>),
    Mapping(
        Position,
        usize,
        Vec<(String, Position, Node)>,
        Option<(String, Position)>,
    ),
}

impl Builder {
    fn push(&mut self, node: Node, anchor: usize) {
        if anchor > 0 {
            self.anchors.insert(anchor, node.clone());
        }
        match self.stack.last_mut() {
            None => self.root = Some(node),
            Some(Partial::Sequence(_, _, items)) => items.push(node),
            Some(Partial::Mapping(_, _, entries, pending_key)) => match pending_key.take() {
                Some((key, key_pos)) => entries.push((key, key_pos, node)),
                None => match node.kind {
                    NodeKind::Scalar(key, _) => *pending_key = Some((key, node.position)),
                    _ => self.errors.push(DocumentError {
                        position: node.position,
                        path: String::new(),
                        message: "mapping keys must be plain strings".into(),
                    }),
                },
            },
        }
    }
}

impl MarkedEventReceiver for Builder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let position = Position::from(mark);
        match ev {
            Event::Scalar(text, style, anchor, _tag) => self.push(
                Node {
                    position,
                    kind: NodeKind::Scalar(text, style),
                },
                anchor,
            ),
            Event::Alias(id) => match self.anchors.get(&id).cloned() {
                Some(node) => self.push(node, 0),
                None => self.errors.push(DocumentError {
                    position,
                    path: String::new(),
                    message: "alias refers to an unknown anchor".into(),
                }),
            },
            Event::SequenceStart(anchor, _) => {
                self.stack.push(Partial::Sequence(position, anchor, Vec::new()))
            }
            Event::MappingStart(anchor, _) => {
                self.stack
                    .push(Partial::Mapping(position, anchor, Vec::new(), None))
            }
            Event::SequenceEnd | Event::MappingEnd => match self.stack.pop() {
                Some(Partial::Sequence(pos, anchor, items)) => self.push(
                    Node {
                        position: pos,
                        kind: NodeKind::Sequence(items),
                    },
                    anchor,
                ),
                Some(Partial::Mapping(pos, anchor, entries, _)) => self.push(
                    Node {
                        position: pos,
                        kind: NodeKind::Mapping(entries),
                    },
                    anchor,
                ),
                None => {}
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Document {
        Document::parse(text, &Interpolator::from_pairs(&[("B", "b:1")])).expect("parses")
    }

    #[test]
    fn positions_point_at_values_and_keys() {
        let doc = parse("kafka:\n  brokers: ${B}\nroutes:\n  - name: x\n    port: 8080\n");
        assert_eq!(doc.value["kafka"]["brokers"], "b:1");
        assert_eq!(doc.value["routes"][0]["port"], 8080);
        assert_eq!(doc.position("routes[0].port"), Position { line: 5, column: 11 });
        assert_eq!(
            doc.key_position("routes[0].port"),
            Some(Position { line: 5, column: 5 })
        );
        // A path below a scalar falls back to the nearest node that exists.
        assert_eq!(doc.position("kafka.brokers.x"), Position { line: 2, column: 12 });
    }

    #[test]
    fn quoted_scalars_stay_strings() {
        let doc = parse("a: '5'\nb: 5\nc: \"true\"\nd: 1.5\ne: ~\n");
        assert_eq!(doc.value["a"], "5");
        assert_eq!(doc.value["b"], 5);
        assert_eq!(doc.value["c"], "true");
        assert_eq!(doc.value["d"], 1.5);
        assert!(doc.value["e"].is_null());
    }

    #[test]
    fn every_error_is_reported() {
        let errors = Document::parse(
            "a: ${NOPE}\nb: ${ALSO_NOPE}\na: 1\n",
            &Interpolator::from_pairs(&[]),
        )
        .unwrap_err();
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert_eq!(errors[0].position, Position { line: 1, column: 4 });
        assert!(errors[2].message.contains("twice"));
    }

    #[test]
    fn aliases_resolve() {
        let doc = parse("x: &r { a: 1 }\ny: *r\n");
        assert_eq!(doc.value["y"]["a"], 1);
    }

    #[test]
    fn syntax_errors_have_a_position() {
        let errors = Document::parse("a: [1, 2\n", &Interpolator::from_pairs(&[])).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(errors[0].position.line >= 1);
    }
}
