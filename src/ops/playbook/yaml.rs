//! YAML with positions, shared by the playbook parser and the inventory.
//!
//! We walk `marked_yaml` nodes ourselves instead of deserialising with serde, because every error must
//! point at the key or value at fault (`file:line:col`) and list the valid choices. The loader is run
//! with coercion off, which is how we learn whether a scalar was written plain (`true`, `22`, `~`) or
//! quoted (`"22"` stays a string); plain scalars are typed by the YAML 1.2 core schema, so `yes`/`no`
//! stay strings, as in YAML 1.2.
//!
//! What `marked_yaml` refuses, we refuse too, with a message that says what to write instead: anchors
//! and aliases, tags, and keys that are not plain values. A second YAML document in one file is an error
//! rather than silently ignored.

use std::sync::Arc;

use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode};
use marked_yaml::{LoadError, LoaderOptions, Marker, Node, Span};
use serde_json::Value;

use super::model::{Location, ParseError};

/// What the top level of a file must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Top {
    Mapping,
    Sequence,
}

/// One source file: its name (for locations) and helpers that turn spans into errors.
#[derive(Debug, Clone)]
pub struct Source {
    pub file: Arc<str>,
}

impl Source {
    pub fn new(file: &str) -> Self {
        Source { file: file.into() }
    }

    /// The location of a marker (1-based line and column).
    pub fn at(&self, marker: Option<&Marker>) -> Location {
        let (line, column) = marker.map_or((1, 1), |m| (m.line(), m.column()));
        Location {
            file: self.file.clone(),
            line,
            column,
        }
    }

    pub fn span(&self, span: &Span) -> Location {
        self.at(span.start())
    }

    /// Where a node starts. A block mapping's own span starts after its first key, so a mapping is
    /// located at its first key.
    pub fn node(&self, node: &Node) -> Location {
        match node {
            Node::Mapping(m) => self.mapping(m),
            _ => self.span(node.span()),
        }
    }

    pub fn mapping(&self, map: &MarkedMappingNode) -> Location {
        // A flow mapping's span starts at its `{`, before the first key; a block mapping's after it.
        let start = map.span().start();
        let first = map.keys().next().and_then(|k| k.span().start());
        match (start, first) {
            (Some(s), Some(f)) if f.character() < s.character() => self.at(Some(f)),
            (Some(s), _) => self.at(Some(s)),
            (None, f) => self.at(f),
        }
    }

    pub fn key(&self, key: &MarkedScalarNode) -> Location {
        self.span(key.span())
    }

    /// Where the value of `key` is. An empty value (`key:` and nothing after it) has no position of its
    /// own (the loader gives it the next token's), so it is located at its key.
    pub fn value(&self, key: &MarkedScalarNode, value: &Node) -> Location {
        match value {
            Node::Scalar(s) if is_null(s) => self.key(key),
            _ => self.node(value),
        }
    }

    pub fn error(&self, location: Location, message: impl Into<String>) -> ParseError {
        let _ = self;
        ParseError {
            location,
            message: message.into(),
        }
    }

    /// Parses `text`, turning every loader error into a located, readable one.
    pub fn load(&self, text: &str, top: Top) -> Result<Node, ParseError> {
        if let Some(line) = second_document(text) {
            return Err(ParseError {
                location: Location {
                    file: self.file.clone(),
                    line,
                    column: 1,
                },
                message:
                    "a second YAML document (`---`) is not supported: one file holds one document"
                        .into(),
            });
        }
        let options = LoaderOptions::default()
            .prevent_coercion(true)
            .error_on_duplicate_keys(true);
        let options = match top {
            Top::Mapping => options.toplevel_mapping(),
            Top::Sequence => options.toplevel_sequence(),
        };
        let node = marked_yaml::parse_yaml_with_options(0, text, options)
            .map_err(|e| self.load_error(e, text, top))?;
        // An empty file loads as an empty mapping whatever we asked for.
        match (&node, top) {
            (Node::Mapping(m), Top::Sequence) if m.is_empty() => Ok(Node::Sequence(
                marked_yaml::types::MarkedSequenceNode::new_empty(*m.span()),
            )),
            _ => Ok(node),
        }
    }

    fn load_error(&self, e: LoadError, text: &str, top: Top) -> ParseError {
        let wrong_top = |_: Marker| {
            let want = match top {
                Top::Mapping => "a mapping (`key: value` lines)",
                Top::Sequence => "a list (`- ` items)",
            };
            // The loader's marker is inside the first node; the whole document is at fault.
            let (line, column) = first_content(text);
            let at = Location {
                file: self.file.clone(),
                line,
                column,
            };
            self.error(at, format!("the file must hold {want}"))
        };
        match e {
            LoadError::TopLevelMustBeMapping(m) | LoadError::TopLevelMustBeSequence(m) => wrong_top(m),
            LoadError::UnexpectedAnchor(m) => self.error(
                self.at(Some(&m)),
                "YAML anchors and aliases (`&name`, `*name`) are not supported: write the value out",
            ),
            LoadError::UnexpectedTag(m) => self.error(
                self.at(Some(&m)),
                "YAML tags (`!!str`, `!name`) are not supported: quote a value to make it a string",
            ),
            LoadError::MappingKeyMustBeScalar(m) => self.error(
                self.at(Some(&m)),
                "a key must be a plain name; a value that starts with `{{` must be quoted: \"{{ … }}\"",
            ),
            LoadError::DuplicateKey(inner) => {
                let first = self.key(&inner.prev_key);
                self.error(
                    self.key(&inner.key),
                    format!(
                        "`{}` is given twice (first at line {}, column {})",
                        inner.key.as_str(),
                        first.line,
                        first.column
                    ),
                )
            }
            LoadError::ScanError(m, scan) => {
                let info = scan.info();
                let hint = if info.contains("mapping values are not allowed")
                    || info.contains("did not find expected key")
                    || info.contains("did not find expected '-'")
                {
                    " (check the indentation of this line and the one before)"
                } else if info.contains("tab") {
                    " (indent with spaces, not tabs)"
                } else {
                    ""
                };
                self.error(self.at(Some(&m)), format!("invalid YAML: {info}{hint}"))
            }
        }
    }
}

/// The line (1-based) of a document start marker that follows content, if any.
fn second_document(text: &str) -> Option<usize> {
    let mut content_seen = false;
    for (i, line) in text.lines().enumerate() {
        let is_marker =
            line == "---" || line.starts_with("--- ") || line == "..." || line.starts_with("... ");
        if is_marker {
            // `...` ends a document; only a following `---` or content would start another.
            if content_seen && line.starts_with("---") {
                return Some(i + 1);
            }
            continue;
        }
        let trimmed = line.trim_start();
        if !(trimmed.is_empty() || trimmed.starts_with('#') || line.starts_with('%')) {
            content_seen = true;
        }
    }
    None
}

/// The line and column (1-based) of the first character that is not blank, a comment or a marker.
fn first_content(text: &str) -> (usize, usize) {
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        let skip = trimmed.is_empty()
            || trimmed.starts_with('#')
            || line.starts_with('%')
            || line == "---"
            || line.starts_with("--- ");
        if !skip {
            return (i + 1, line.len() - trimmed.len() + 1);
        }
    }
    (1, 1)
}

/// `~`, `null`, or nothing at all, written plain.
pub fn is_null(s: &MarkedScalarNode) -> bool {
    s.may_coerce() && matches!(s.as_str(), "" | "~" | "null" | "Null" | "NULL")
}

/// A scalar as JSON: plain scalars typed by the YAML 1.2 core schema, quoted and block scalars strings.
pub fn scalar_to_json(s: &MarkedScalarNode) -> Value {
    let text = s.as_str();
    if !s.may_coerce() {
        return Value::String(text.to_string());
    }
    if is_null(s) {
        return Value::Null;
    }
    match text {
        "true" | "True" | "TRUE" => return Value::Bool(true),
        "false" | "False" | "FALSE" => return Value::Bool(false),
        _ => {}
    }
    if let Some(n) = core_int(text) {
        // Too large for 64 bits: kept as written rather than rounded.
        return n.unwrap_or_else(|| Value::String(text.to_string()));
    }
    if let Some(f) = core_float(text) {
        if let Some(n) = serde_json::Number::from_f64(f) {
            return Value::Number(n);
        }
    }
    Value::String(text.to_string())
}

/// `None`: not an integer; `Some(None)`: an integer that does not fit in 64 bits.
fn core_int(text: &str) -> Option<Option<Value>> {
    let (neg, digits) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (radix, digits) = if let Some(d) = digits.strip_prefix("0o").filter(|_| !neg) {
        (8, d)
    } else if let Some(d) = digits.strip_prefix("0x").filter(|_| !neg) {
        (16, d)
    } else {
        (10, digits)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let Ok(magnitude) = u64::from_str_radix(digits, radix) else {
        return Some(None);
    };
    if neg {
        // -2^63 does not fit as a positive i64, so go through i128.
        Some(i64::try_from(-i128::from(magnitude)).ok().map(Value::from))
    } else {
        Some(Some(Value::from(magnitude)))
    }
}

fn core_float(text: &str) -> Option<f64> {
    // The core schema: [-+]? ( \. [0-9]+ | [0-9]+ ( \. [0-9]* )? ) ( [eE] [-+]? [0-9]+ )?
    // Rust's parser also takes `inf`, `nan` and `1e`; we check the shape first.
    let body = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (mantissa, exponent) = match body.find(['e', 'E']) {
        Some(i) => (&body[..i], Some(&body[i + 1..])),
        None => (body, None),
    };
    let (int, frac) = match mantissa.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (mantissa, None),
    };
    let all_digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    let mantissa_ok = all_digits(int)
        && frac.is_none_or(all_digits)
        && (!int.is_empty() || frac.is_some_and(|f| !f.is_empty()));
    let exponent_ok = exponent.is_none_or(|e| {
        let e = e.strip_prefix(['-', '+']).unwrap_or(e);
        !e.is_empty() && all_digits(e)
    });
    if mantissa_ok && exponent_ok {
        text.parse().ok()
    } else {
        None
    }
}

/// Any node as JSON (mapping keys are strings, in the order written).
pub fn to_json(node: &Node) -> Value {
    match node {
        Node::Scalar(s) => scalar_to_json(s),
        Node::Sequence(seq) => Value::Array(seq.iter().map(to_json).collect()),
        Node::Mapping(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.as_str().to_string(), to_json(v)))
                .collect(),
        ),
    }
}

/// What a node is, for "expected X, found Y" messages.
pub fn describe(node: &Node) -> String {
    match node {
        Node::Mapping(_) => "a mapping".into(),
        Node::Sequence(_) => "a list".into(),
        Node::Scalar(s) if is_null(s) => "nothing".into(),
        Node::Scalar(s) => format!("`{}`", s.as_str()),
    }
}

/// A list of names for messages: `` `a`, `b`, `c` ``.
pub fn list(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// " (did you mean `x`?)" when one of `choices` is a likely misspelling of `word`, else "".
pub fn did_you_mean(word: &str, choices: &[&str]) -> String {
    let word_lc = word.to_lowercase();
    let best = choices
        .iter()
        .map(|c| (edit_distance(&word_lc, &c.to_lowercase()), *c))
        .min_by_key(|(d, _)| *d);
    match best {
        // Allow one edit for short words, up to a third of the length for longer ones.
        Some((d, c)) if d <= (word.chars().count() / 3).max(1) => format!(" (did you mean `{c}`?)"),
        _ => String::new(),
    }
}

/// Levenshtein distance, with a swap of two adjacent letters counted as one edit.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut d = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in d[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1)
                .min(d[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(d[i - 2][j - 2] + 1);
            }
            d[i][j] = best;
        }
    }
    d[a.len()][b.len()]
}

/// A name usable as a template variable (`[A-Za-z_][A-Za-z0-9_]*`).
pub fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Reads a `vars:` mapping: identifier keys, JSON values.
pub fn vars(
    src: &Source,
    key: &MarkedScalarNode,
    value: &Node,
) -> Result<serde_json::Map<String, Value>, ParseError> {
    let map = match value {
        Node::Mapping(m) => m,
        Node::Scalar(s) if is_null(s) => return Ok(serde_json::Map::new()),
        other => {
            return Err(src.error(
                src.value(key, value),
                format!(
                    "`{}` must be a mapping of variables, not {}",
                    key.as_str(),
                    describe(other)
                ),
            ))
        }
    };
    let mut out = serde_json::Map::new();
    for (k, v) in map.iter() {
        if !is_identifier(k.as_str()) {
            return Err(src.error(
                src.key(k),
                format!(
                    "`{}` is not a valid variable name (letters, digits and `_`, not starting with a digit)",
                    k.as_str()
                ),
            ));
        }
        out.insert(k.as_str().to_string(), to_json(v));
    }
    Ok(out)
}

/// A string value: any scalar but a null (a plain `22` or `true` is taken as written).
pub fn string(src: &Source, key: &MarkedScalarNode, value: &Node) -> Result<String, ParseError> {
    match value {
        Node::Scalar(s) if !is_null(s) => Ok(s.as_str().to_string()),
        other => Err(src.error(
            src.value(key, value),
            format!(
                "`{}` must be a string, not {}",
                key.as_str(),
                describe(other)
            ),
        )),
    }
}

/// A boolean: plain `true` or `false`.
pub fn boolean(src: &Source, key: &MarkedScalarNode, value: &Node) -> Result<bool, ParseError> {
    match value {
        Node::Scalar(s) => match scalar_to_json(s) {
            Value::Bool(b) => Ok(b),
            _ => Err(src.error(
                src.value(key, value),
                format!(
                    "`{}` must be true or false, not {}",
                    key.as_str(),
                    describe(value)
                ),
            )),
        },
        other => Err(src.error(
            src.value(key, value),
            format!(
                "`{}` must be true or false, not {}",
                key.as_str(),
                describe(other)
            ),
        )),
    }
}

/// A string or a list of strings, each with its location.
pub fn string_or_list(
    src: &Source,
    key: &MarkedScalarNode,
    value: &Node,
) -> Result<Vec<(String, Location)>, ParseError> {
    let wrong = |node: &Node, at: Location| {
        src.error(
            at,
            format!(
                "`{}` must be a string or a list of strings, not {}",
                key.as_str(),
                describe(node)
            ),
        )
    };
    match value {
        Node::Scalar(s) if !is_null(s) => Ok(vec![(s.as_str().to_string(), src.value(key, value))]),
        Node::Sequence(items) => items
            .iter()
            .map(|item| match item {
                Node::Scalar(s) if !is_null(s) => Ok((s.as_str().to_string(), src.node(item))),
                other => Err(wrong(other, src.node(item))),
            })
            .collect(),
        other => Err(wrong(other, src.value(key, value))),
    }
}

/// The entry `name` of a mapping, with its key (for locations).
pub fn entry<'a>(
    map: &'a MarkedMappingNode,
    name: &str,
) -> Option<(&'a MarkedScalarNode, &'a Node)> {
    map.iter().find(|(k, _)| k.as_str() == name)
}

/// Refuses a key of `map` that is not in `valid`, at the key, with a did-you-mean and the valid ones.
pub fn check_keys(
    src: &Source,
    map: &MarkedMappingNode,
    valid: &[&str],
    what: &str,
) -> Result<(), ParseError> {
    for key in map.keys() {
        if !valid.contains(&key.as_str()) {
            return Err(src.error(
                src.key(key),
                format!(
                    "unknown {what} `{}`{}; valid: {}",
                    key.as_str(),
                    did_you_mean(key.as_str(), valid),
                    list(valid)
                ),
            ));
        }
    }
    Ok(())
}

/// A port number (1–65535), written plain.
pub fn port(src: &Source, key: &MarkedScalarNode, value: &Node) -> Result<u16, ParseError> {
    let n = match value {
        Node::Scalar(s) => scalar_to_json(s).as_u64(),
        _ => None,
    };
    n.and_then(|n| u16::try_from(n).ok())
        .filter(|n| *n != 0)
        .ok_or_else(|| {
            src.error(
                src.value(key, value),
                format!(
                    "`{}` must be a port number from 1 to 65535, not {}",
                    key.as_str(),
                    describe(value)
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn value_of(text: &str) -> Value {
        let node = Source::new("t.yml").load(text, Top::Mapping).unwrap();
        to_json(node.as_mapping().unwrap().get_node("v").unwrap())
    }

    #[test]
    fn plain_scalars_are_typed_by_the_yaml_1_2_core_schema() {
        assert_eq!(value_of("v: true"), json!(true));
        assert_eq!(value_of("v: False"), json!(false));
        assert_eq!(value_of("v: yes"), json!("yes"));
        assert_eq!(value_of("v: 22"), json!(22));
        assert_eq!(value_of("v: -3"), json!(-3));
        assert_eq!(value_of("v: -9223372036854775808"), json!(i64::MIN));
        assert_eq!(value_of("v: 0644"), json!(644));
        assert_eq!(value_of("v: 0o644"), json!(0o644));
        assert_eq!(value_of("v: 0x1F"), json!(31));
        assert_eq!(value_of("v: 1.5"), json!(1.5));
        assert_eq!(value_of("v: 1e3"), json!(1000.0));
        assert_eq!(value_of("v: 1.2.3"), json!("1.2.3"));
        assert_eq!(value_of("v: inf"), json!("inf"));
        assert_eq!(value_of("v: ~"), json!(null));
        assert_eq!(value_of("v: null"), json!(null));
        assert_eq!(value_of("v:"), json!(null));
        assert_eq!(
            value_of("v: 99999999999999999999"),
            json!("99999999999999999999")
        );
    }

    #[test]
    fn quoted_and_block_scalars_stay_strings() {
        assert_eq!(value_of("v: \"true\""), json!("true"));
        assert_eq!(value_of("v: '22'"), json!("22"));
        assert_eq!(value_of("v: \"\""), json!(""));
        assert_eq!(value_of("v: '~'"), json!("~"));
        assert_eq!(value_of("v: |\n  22\n"), json!("22\n"));
        assert_eq!(
            value_of("v: [1, 'a', {b: no}]"),
            json!([1, "a", {"b": "no"}])
        );
    }

    #[test]
    fn misspellings_are_suggested_only_when_close() {
        assert_eq!(
            did_you_mean("aptt", &["apt", "user"]),
            " (did you mean `apt`?)"
        );
        assert_eq!(
            did_you_mean("sevrice", &["service", "user"]),
            " (did you mean `service`?)"
        );
        assert_eq!(
            did_you_mean("Notify", &["notify"]),
            " (did you mean `notify`?)"
        );
        assert_eq!(did_you_mean("zzz", &["apt", "user"]), "");
        assert_eq!(edit_distance("ab", "ba"), 1);
    }

    #[test]
    fn anchors_tags_and_second_documents_are_refused_with_a_location() {
        let src = Source::new("f.yml");
        let e = src.load("a: &x 1\nb: *x\n", Top::Mapping).unwrap_err();
        assert_eq!(e.location.line, 1);
        assert!(e.message.contains("anchors"), "{e}");
        let e = src.load("a: !!str 1\n", Top::Mapping).unwrap_err();
        assert!(e.message.contains("tags"), "{e}");
        let e = src
            .load("# c\n---\na: 1\n---\nb: 2\n", Top::Mapping)
            .unwrap_err();
        assert_eq!(e.location.line, 4, "{e}");
        let e = src.load("a: 1\na: 2\n", Top::Mapping).unwrap_err();
        assert_eq!((e.location.line, e.location.column), (2, 1), "{e}");
        assert!(
            e.message
                .contains("given twice (first at line 1, column 1)"),
            "{e}"
        );
        let e = src.load("- a\n", Top::Mapping).unwrap_err();
        assert!(e.message.contains("must hold a mapping"), "{e}");
    }
}
