//! JSON, byte by byte: the automaton that constrained decoding asks "may
//! this token come next?" ([`crate::Generator::generate`] with
//! [`mycel_protocol::OutputFormat::JsonObject`] or `JsonSchema`).
//!
//! It follows RFC 8259's grammar over bytes (inside strings any byte from
//! 0x20 up passes, so UTF-8 text does), keeps a stack of open containers,
//! and knows the shortest way to close what is open ([`Json::completion`]),
//! so a generation running out of tokens can still end in valid JSON.
//!
//! With a [`Schema`] (a subset of JSON Schema, [`Schema::compile`]) each
//! value must also have the type the schema gives it: objects only the
//! declared properties, each at most once, closed only once the required
//! ones are there; strings from an `enum` only those; integers no fraction.
//! The shortest completion then fills in the required properties.
//! Runs of whitespace between tokens are capped ([`MAX_WHITESPACE`]): a
//! small model under a JSON constraint otherwise likes to emit newlines
//! until its budget is gone.

use std::sync::Arc;

/// Longest run of whitespace allowed between JSON tokens, in bytes: deep
/// pretty-printed indentation fits; an endless run of newlines does not.
pub const MAX_WHITESPACE: u16 = 64;
/// Longest number, in bytes (an f64 needs at most 24).
const MAX_NUMBER: u8 = 32;

/// The shapes a schema may give a value: the part of JSON Schema that
/// constrained decoding honours. Anything else in a schema is refused at
/// [`Schema::compile`], never ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Schema {
    /// Any JSON value.
    Any,
    /// An object with exactly these properties allowed (in this order when
    /// completing), of which `required` must be present.
    Object {
        /// Property names and their schemas.
        properties: Vec<(String, Arc<Schema>)>,
        /// Names that must be present.
        required: Vec<String>,
    },
    /// Any object (`{"type": "object"}` without properties).
    AnyObject,
    /// An array of `items`.
    Array(Arc<Schema>),
    /// A string, or one of these strings.
    String(Option<Vec<String>>),
    /// A number; `true` for integers only.
    Number(bool),
    /// `true` or `false`.
    Boolean,
    /// `null`.
    Null,
}

/// Keywords that describe and constrain nothing a generation could break.
const ANNOTATIONS: [&str; 5] = ["description", "title", "$schema", "examples", "default"];

impl Schema {
    /// Reads a JSON Schema: `type` (object, array, string, number,
    /// integer, boolean, null), `properties`, `required`,
    /// `additionalProperties: false` (what constrained objects are
    /// anyway), `items`, string `enum`, and annotations. Anything else (a
    /// `pattern`, `minimum`, `anyOf`, `$ref`...) is an error naming it.
    pub fn compile(schema: &serde_json::Value) -> Result<Self, String> {
        let serde_json::Value::Object(s) = schema else { return Err("a schema must be a JSON object".into()) };
        for key in s.keys() {
            let known = ["type", "properties", "required", "additionalProperties", "items", "enum"];
            if !known.contains(&key.as_str()) && !ANNOTATIONS.contains(&key.as_str()) {
                return Err(format!("schema keyword {key:?} is not supported"));
            }
        }
        if let Some(extra) = s.get("additionalProperties")
            && extra != &serde_json::Value::Bool(false)
        {
            return Err("additionalProperties: only false is supported".into());
        }
        let kind = s.get("type").map(|t| t.as_str().ok_or("type: one name (a string), not a list"));
        if let Some(values) = s.get("enum") {
            let strings: Option<Vec<&str>> = values.as_array().and_then(|v| v.iter().map(|x| x.as_str()).collect());
            return match (kind, strings) {
                (None | Some(Ok("string")), Some(list)) if !list.is_empty() => {
                    Ok(Schema::String(Some(list.into_iter().map(plain).collect::<Result<_, _>>()?)))
                }
                _ => Err("enum: only a non-empty list of strings is supported".into()),
            };
        }
        match kind.transpose()? {
            None => Ok(Schema::Any),
            Some("object") => {
                let Some(props) = s.get("properties") else { return Ok(Schema::AnyObject) };
                let serde_json::Value::Object(props) = props else { return Err("properties: an object".into()) };
                let properties = props
                    .iter()
                    .map(|(name, sub)| Ok((plain(name)?, Arc::new(Schema::compile(sub)?))))
                    .collect::<Result<Vec<_>, String>>()?;
                let required: Vec<String> = match s.get("required") {
                    None => Vec::new(),
                    Some(r) => r
                        .as_array()
                        .ok_or("required: a list of names")?
                        .iter()
                        .map(|n| n.as_str().map(str::to_string).ok_or("required: a list of names"))
                        .collect::<Result<_, _>>()?,
                };
                if let Some(missing) = required.iter().find(|r| !properties.iter().any(|(n, _)| n == *r)) {
                    return Err(format!("required: {missing:?} is not among the properties"));
                }
                Ok(Schema::Object { properties, required })
            }
            Some("array") => Ok(Schema::Array(Arc::new(match s.get("items") {
                Some(items) => Schema::compile(items)?,
                None => Schema::Any,
            }))),
            Some("string") => Ok(Schema::String(None)),
            Some("number") => Ok(Schema::Number(false)),
            Some("integer") => Ok(Schema::Number(true)),
            Some("boolean") => Ok(Schema::Boolean),
            Some("null") => Ok(Schema::Null),
            Some(other) => Err(format!("type {other:?} is not a JSON type")),
        }
    }
}

impl Schema {
    /// A schema for a whole answer (JSON text): its top must be an object,
    /// as OpenAI's `json_schema` mode also requires.
    pub fn root(text: &str) -> Result<Self, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("the schema is not JSON: {e}"))?;
        match Schema::compile(&value)? {
            s @ (Schema::Object { .. } | Schema::AnyObject) => Ok(s),
            _ => Err("the schema's top must be {\"type\": \"object\", ...}".into()),
        }
    }
}

/// A name or enum value constrained byte by byte: no escapes needed.
fn plain(s: &str) -> Result<String, String> {
    if s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        return Err(format!(
            "{s:?}: names and enum values with quotes, backslashes or control characters are not supported"
        ));
    }
    Ok(s.to_string())
}

/// Where in a JSON text the bytes so far have left off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Json {
    stack: Vec<Frame>,
    mode: Mode,
    whitespace: u16,
    /// The schema of the value that comes next (in `Start`, `Value` and
    /// `ArrayFirst`).
    expect: Arc<Schema>,
}

/// An open container and what its schema still allows.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Frame {
    /// An object; `seen` are the keys so far (constrained objects only).
    Object { schema: Arc<Schema>, seen: Vec<String> },
    /// An array of `items`.
    Array { items: Arc<Schema> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Mode {
    /// Before the top-level object.
    Start,
    /// A value must come (after `:`, or `,` in an array).
    Value,
    /// Just after `[`: a value or `]`.
    ArrayFirst,
    /// Just after `{`: a key or `}`.
    ObjectFirst,
    /// After `,` in an object: a key.
    Key,
    /// After a key: `:`.
    Colon,
    /// After a value: `,` or the closing bracket.
    After,
    /// Inside a string; `text` so far where it is constrained (a key of a
    /// schema's object, a value from an enum).
    Str { key: bool, escape: Escape, text: Option<Vec<u8>> },
    /// Inside a number.
    Number { part: Num, length: u8, integer: bool },
    /// Inside `true`, `false` or `null`: the bytes still to come.
    Literal { rest: &'static [u8] },
    /// The top-level object is closed.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    None,
    Backslash,
    /// Hex digits of `\uXXXX` still to come.
    Unicode(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Num {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ExpSign,
    Exp,
}

impl Num {
    fn next(self, b: u8) -> Option<Num> {
        use Num::*;
        match (self, b) {
            (Minus, b'0') => Some(Zero),
            (Minus, b'1'..=b'9') => Some(Int),
            (Int, b'0'..=b'9') => Some(Int),
            (Zero | Int, b'.') => Some(Dot),
            (Dot | Frac, b'0'..=b'9') => Some(Frac),
            (Zero | Int | Frac, b'e' | b'E') => Some(E),
            (E, b'+' | b'-') => Some(ExpSign),
            (E | ExpSign | Exp, b'0'..=b'9') => Some(Exp),
            _ => None,
        }
    }

    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::Exp)
    }
}

impl Default for Json {
    fn default() -> Self {
        Self::object()
    }
}

/// The value a schema gives first: what completing a value emits.
fn first_byte(schema: &Schema) -> u8 {
    match schema {
        Schema::Object { .. } | Schema::AnyObject => b'{',
        Schema::Array(_) => b'[',
        Schema::String(_) => b'"',
        Schema::Number(_) | Schema::Any => b'0',
        Schema::Boolean => b'f',
        Schema::Null => b'n',
    }
}

impl Json {
    /// Expects one JSON object (OpenAI's `json_object` mode).
    pub fn object() -> Self {
        Self::with_schema(Arc::new(Schema::AnyObject))
    }

    /// Expects one value valid for `schema` (an object, for `json_schema`
    /// mode, whose schemas have an object at the top).
    pub fn with_schema(schema: Arc<Schema>) -> Self {
        Self { stack: Vec::new(), mode: Mode::Start, whitespace: 0, expect: schema }
    }

    /// Whether the value is complete: nothing more may follow.
    pub fn is_done(&self) -> bool {
        self.mode == Mode::Done
    }

    /// Takes `bytes` if they may come next; on `false` the state is
    /// unchanged.
    pub fn push_all(&mut self, bytes: &[u8]) -> bool {
        let mut next = self.clone();
        if bytes.iter().all(|&b| next.push(b)) {
            *self = next;
            true
        } else {
            false
        }
    }

    /// Whether `bytes` may come next, without taking them.
    pub fn accepts(&self, bytes: &[u8]) -> bool {
        self.clone().push_all(bytes)
    }

    /// Takes one byte; `false` if JSON (or the schema) does not allow it
    /// here (the state is then unspecified: see [`Self::push_all`]).
    fn push(&mut self, b: u8) -> bool {
        if let Mode::Number { part, length, integer } = self.mode {
            let fraction = matches!(b, b'.' | b'e' | b'E');
            match part.next(b) {
                Some(_) if integer && fraction => return false,
                Some(part) if length < MAX_NUMBER => {
                    self.mode = Mode::Number { part, length: length + 1, integer };
                    return true;
                }
                Some(_) => return false,
                None if part.complete() => self.mode = self.after_value(),
                None => return false,
            }
        }
        match &mut self.mode {
            Mode::Str { key, escape, text } => {
                let (key, escape, text) = (*key, *escape, text.take());
                return self.string(b, key, escape, text);
            }
            Mode::Literal { rest } => {
                if rest.first() != Some(&b) {
                    return false;
                }
                self.mode = if rest.len() == 1 { self.after_value() } else { Mode::Literal { rest: &rest[1..] } };
                return true;
            }
            Mode::Done => return false,
            _ => {}
        }
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            self.whitespace += 1;
            return self.whitespace <= MAX_WHITESPACE;
        }
        self.whitespace = 0;
        match (&self.mode, b) {
            (Mode::Start | Mode::Value | Mode::ArrayFirst, _) => return self.value(b),
            (Mode::ObjectFirst | Mode::Key, b'"') => {
                let text = self.constrained_object().then(Vec::new);
                self.mode = Mode::Str { key: true, escape: Escape::None, text };
            }
            (Mode::ObjectFirst, b'}') if self.may_close() => self.close(),
            (Mode::Colon, b':') => {
                self.mode = Mode::Value;
            }
            (Mode::After, b',') => match self.stack.last() {
                Some(Frame::Object { .. }) if self.keys_left().is_some_and(|k| k.is_empty()) => return false,
                Some(Frame::Object { .. }) => self.mode = Mode::Key,
                Some(Frame::Array { items }) => {
                    self.expect = items.clone();
                    self.mode = Mode::Value;
                }
                None => return false,
            },
            (Mode::After, b'}') if matches!(self.stack.last(), Some(Frame::Object { .. })) && self.may_close() => {
                self.close()
            }
            (Mode::After, b']') if matches!(self.stack.last(), Some(Frame::Array { .. })) => self.close(),
            _ => return false,
        }
        true
    }

    /// The first byte of a value of the expected schema (or `]` closing an
    /// empty array).
    fn value(&mut self, b: u8) -> bool {
        let expect = self.expect.clone();
        let any = matches!(*expect, Schema::Any);
        let number = |integer| Mode::Number { part: Num::Minus, length: 1, integer };
        self.mode = match (b, &*expect) {
            (b']', _) if self.mode == Mode::ArrayFirst => {
                self.close();
                return true;
            }
            (b'{', Schema::Object { .. } | Schema::AnyObject | Schema::Any) => {
                let schema = if any { Arc::new(Schema::AnyObject) } else { expect };
                self.stack.push(Frame::Object { schema, seen: Vec::new() });
                Mode::ObjectFirst
            }
            (b'[', Schema::Array(items)) => {
                self.stack.push(Frame::Array { items: items.clone() });
                self.expect = items.clone();
                Mode::ArrayFirst
            }
            (b'[', Schema::Any) => {
                self.stack.push(Frame::Array { items: expect.clone() });
                Mode::ArrayFirst
            }
            (b'"', Schema::String(choices)) => {
                Mode::Str { key: false, escape: Escape::None, text: choices.as_ref().map(|_| Vec::new()) }
            }
            (b'"', Schema::Any) => Mode::Str { key: false, escape: Escape::None, text: None },
            (b'-', Schema::Number(integer)) => number(*integer),
            (b'-', Schema::Any) => number(false),
            (b'0'..=b'9', Schema::Number(_) | Schema::Any) => {
                let integer = matches!(*expect, Schema::Number(true));
                let part = if b == b'0' { Num::Zero } else { Num::Int };
                Mode::Number { part, length: 1, integer }
            }
            (b't', Schema::Boolean | Schema::Any) => Mode::Literal { rest: b"rue" },
            (b'f', Schema::Boolean | Schema::Any) => Mode::Literal { rest: b"alse" },
            (b'n', Schema::Null | Schema::Any) => Mode::Literal { rest: b"ull" },
            _ => return false,
        };
        true
    }

    fn string(&mut self, b: u8, key: bool, escape: Escape, mut text: Option<Vec<u8>>) -> bool {
        if let Some(so_far) = &mut text {
            // Constrained: a declared name or an enum value, no escapes.
            let choices = if key { self.keys_left().unwrap_or_default() } else { self.enum_values() };
            if b == b'"' {
                let Some(done) = choices.into_iter().find(|c| c.as_bytes() == so_far.as_slice()) else { return false };
                if key {
                    self.begin_property(&done);
                } else {
                    self.mode = self.after_value();
                }
                return true;
            }
            if b < 0x20 || b == b'\\' {
                return false;
            }
            so_far.push(b);
            if !choices.iter().any(|c| c.as_bytes().starts_with(so_far)) {
                return false;
            }
            self.mode = Mode::Str { key, escape: Escape::None, text };
            return true;
        }
        let escape = match (escape, b) {
            (Escape::None, b'"') => {
                self.mode = if key { Mode::Colon } else { self.after_value() };
                if key {
                    self.expect = Arc::new(Schema::Any);
                }
                return true;
            }
            (Escape::None, b'\\') => Escape::Backslash,
            (Escape::None, 0x20..) => Escape::None,
            (Escape::Backslash, b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => Escape::None,
            (Escape::Backslash, b'u') => Escape::Unicode(4),
            (Escape::Unicode(n), _) if b.is_ascii_hexdigit() => {
                if n == 1 {
                    Escape::None
                } else {
                    Escape::Unicode(n - 1)
                }
            }
            _ => return false,
        };
        self.mode = Mode::Str { key, escape, text: None };
        true
    }

    /// A declared property's key is complete: its value comes next.
    fn begin_property(&mut self, name: &str) {
        if let Some(Frame::Object { schema, seen }) = self.stack.last_mut() {
            if let Schema::Object { properties, .. } = &**schema
                && let Some((_, sub)) = properties.iter().find(|(n, _)| n == name)
            {
                self.expect = sub.clone();
            }
            seen.push(name.to_string());
        }
        self.mode = Mode::Colon;
    }

    /// Whether the innermost object has declared properties.
    fn constrained_object(&self) -> bool {
        matches!(self.stack.last(), Some(Frame::Object { schema, .. }) if matches!(**schema, Schema::Object { .. }))
    }

    /// The declared properties of the innermost object not yet given
    /// (`None` for an object of any members).
    fn keys_left(&self) -> Option<Vec<String>> {
        let Some(Frame::Object { schema, seen }) = self.stack.last() else { return None };
        let Schema::Object { properties, .. } = &**schema else { return None };
        Some(properties.iter().map(|(n, _)| n.clone()).filter(|n| !seen.contains(n)).collect())
    }

    /// Required properties of the innermost object not yet given.
    fn required_left(&self) -> Vec<String> {
        let Some(Frame::Object { schema, seen }) = self.stack.last() else { return Vec::new() };
        let Schema::Object { required, .. } = &**schema else { return Vec::new() };
        required.iter().filter(|r| !seen.contains(r)).cloned().collect()
    }

    fn may_close(&self) -> bool {
        self.required_left().is_empty()
    }

    /// The enum the string being read must come from.
    fn enum_values(&self) -> Vec<String> {
        match &*self.expect {
            Schema::String(Some(values)) => values.clone(),
            _ => Vec::new(),
        }
    }

    fn close(&mut self) {
        self.stack.pop();
        self.mode = self.after_value();
    }

    fn after_value(&self) -> Mode {
        if self.stack.is_empty() { Mode::Done } else { Mode::After }
    }

    /// The shortest bytes that complete the JSON from here (empty once
    /// done): what a generation about to run out of tokens must emit. With
    /// a schema, missing required properties are filled in with the
    /// smallest values their schemas allow.
    pub fn completion(&self) -> Vec<u8> {
        let mut state = self.clone();
        let mut out = Vec::new();
        while state.mode != Mode::Done {
            let close = |state: &Json| match state.stack.last() {
                Some(Frame::Array { .. }) => b']',
                _ => b'}',
            };
            let b = match &state.mode {
                Mode::Start | Mode::Value => first_byte(&state.expect),
                Mode::ArrayFirst => b']',
                Mode::ObjectFirst if state.may_close() => b'}',
                Mode::ObjectFirst | Mode::Key => b'"',
                Mode::After if state.may_close() => close(&state),
                Mode::After => b',',
                Mode::Colon => b':',
                Mode::Str { key, escape: Escape::None, text: Some(so_far) } => {
                    // Finish the name or value begun, preferring one the
                    // object still requires.
                    let mut choices = if *key { state.keys_left().unwrap_or_default() } else { state.enum_values() };
                    let required = state.required_left();
                    choices.sort_by_key(|c| !(*key && required.contains(c)));
                    let pick = choices.iter().find(|c| c.as_bytes().starts_with(so_far));
                    match pick {
                        Some(c) if c.len() > so_far.len() => c.as_bytes()[so_far.len()],
                        _ => b'"',
                    }
                }
                Mode::Str { escape: Escape::None, .. } => b'"',
                Mode::Str { escape: Escape::Backslash, .. } => b'n',
                Mode::Str { escape: Escape::Unicode(_), .. } => b'0',
                Mode::Number { part, .. } if part.complete() => {
                    if state.stack.is_empty() {
                        break;
                    }
                    // Closing ends the number; if the object needs more,
                    // a comma does.
                    if matches!(state.stack.last(), Some(Frame::Object { .. })) && !state.may_close() {
                        b','
                    } else {
                        close(&state)
                    }
                }
                Mode::Number { .. } => b'0',
                Mode::Literal { rest } => rest[0],
                Mode::Done => break,
            };
            // The rules above only ever pick an allowed byte.
            let taken = state.push(b);
            debug_assert!(taken, "completion byte {b} refused in {:?}", state.mode);
            if !taken {
                break;
            }
            out.push(b);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid(text: &str) -> bool {
        let mut j = Json::object();
        j.push_all(text.as_bytes()) && j.is_done()
    }

    #[test]
    fn objects_are_accepted_and_everything_else_refused() {
        for ok in [
            "{}",
            r#"{"a": 1}"#,
            r#" { "a" : [1, -2.5e+3, 0, true, false, null, "x\"y\u00e9", {"b": []}] } "#.trim_end(),
            r#"{"naïve": "ü€"}"#,
            "{\n  \"a\": {\"b\": {\"c\": [[], {}]}}\n}",
        ] {
            assert!(valid(ok), "{ok}");
        }
        for bad in [
            "[]",
            "1",
            "{",
            r#"{"a"}"#,
            r#"{"a": 01}"#,
            r#"{"a": 1,}"#,
            r#"{"a": [1,]}"#,
            r#"{"a": tru}"#,
            r#"{"a": "\x"}"#,
            "{\"a\": \"line\nbreak\"}",
            r#"{} {}"#,
            r#"{"a": -}"#,
            r#"{"a": 1.}"#,
            r#"{a: 1}"#,
        ] {
            assert!(!valid(bad), "{bad}");
        }
    }

    #[test]
    fn a_refused_push_changes_nothing() {
        let mut j = Json::object();
        assert!(j.push_all(b"{\"a\": "));
        let before = j.clone();
        assert!(!j.push_all(b"}"));
        assert_eq!(j, before);
        assert!(j.accepts(b"12"));
        assert_eq!(j, before);
    }

    #[test]
    fn every_prefix_completes_to_valid_json() {
        let text = r#"{"key": [1, -2.5e-3, "s\u00e9\n", true, null, {"x": false}], "k2": {}, "n": 10}"#;
        for cut in 0..=text.len() {
            let mut j = Json::object();
            assert!(j.push_all(&text.as_bytes()[..cut]), "prefix {cut}");
            let mut done = text.as_bytes()[..cut].to_vec();
            done.extend(j.completion());
            let s = String::from_utf8(done).unwrap();
            assert!(serde_json::from_str::<serde_json::Value>(&s).is_ok(), "{s}");
            assert!(valid(&s), "{s}");
        }
    }

    #[test]
    fn whitespace_runs_are_capped() {
        let mut j = Json::object();
        assert!(j.push_all(b"{"));
        assert!(j.push_all(&[b'\n'; MAX_WHITESPACE as usize]));
        assert!(!j.accepts(b"\n"));
        assert!(j.push_all(b"\"a\":\n1}"));
    }

    fn schema(value: serde_json::Value) -> Arc<Schema> {
        Arc::new(Schema::compile(&value).unwrap())
    }

    fn fits(schema: &Arc<Schema>, text: &str) -> bool {
        let mut j = Json::with_schema(schema.clone());
        j.push_all(text.as_bytes()) && j.is_done()
    }

    fn person() -> Arc<Schema> {
        schema(serde_json::json!({
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "age": {"type": "integer"},
                "mood": {"enum": ["happy", "sad"]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "pet": {"type": "object", "properties": {"kind": {"type": "string"}}, "required": ["kind"]},
                "score": {"type": "number", "description": "0 to 1"},
                "ok": {"type": "boolean"},
                "none": {"type": "null"},
            },
            "required": ["name", "age"],
            "additionalProperties": false,
        }))
    }

    #[test]
    fn a_schema_allows_its_shapes_only() {
        let s = person();
        for ok in [
            r#"{"name": "Ada", "age": 36}"#,
            r#"{"age": -3, "name": "x", "mood": "sad", "tags": ["a", "b"], "pet": {"kind": "cat"}}"#,
            r#"{"name": "A", "age": 1, "score": 0.5e1, "ok": true, "none": null, "tags": []}"#,
        ] {
            assert!(fits(&s, ok), "{ok}");
        }
        for bad in [
            r#"{"name": "Ada"}"#,                        // age required
            r#"{"name": "Ada", "age": 3.5}"#,            // integer
            r#"{"name": "Ada", "age": 3, "extra": 1}"#,  // undeclared
            r#"{"name": "Ada", "name": "B", "age": 3}"#, // twice
            r#"{"name": 3, "age": 3}"#,                  // type
            r#"{"name": "A", "age": 3, "mood": "ok"}"#,  // enum
            r#"{"name": "A", "age": 3, "tags": [1]}"#,   // items
            r#"{"name": "A", "age": 3, "pet": {}}"#,     // nested required
            r#"[]"#,
        ] {
            assert!(!fits(&s, bad), "{bad}");
        }
    }

    #[test]
    fn every_prefix_of_a_valid_text_completes_within_the_schema() {
        let s = person();
        let text = r#"{"mood": "happy", "tags": ["x", "y\n"], "pet": {"kind": "dog"}, "score": -1.5e2, "name": "Zo", "age": 7}"#;
        assert!(fits(&s, text));
        for cut in 0..=text.len() {
            let mut j = Json::with_schema(s.clone());
            assert!(j.push_all(&text.as_bytes()[..cut]), "prefix {cut}");
            let mut done = text.as_bytes()[..cut].to_vec();
            done.extend(j.completion());
            let done = String::from_utf8(done).unwrap();
            assert!(fits(&s, &done), "{done}");
            let value: serde_json::Value = serde_json::from_str(&done).unwrap();
            assert!(value["name"].is_string() && value["age"].is_i64(), "{done}");
        }
        // From nothing: the required members with their smallest values.
        assert_eq!(String::from_utf8(Json::with_schema(s).completion()).unwrap(), r#"{"name":"","age":0}"#);
    }

    #[test]
    fn unsupported_schemas_are_refused_by_name() {
        let refuse = |v: serde_json::Value| Schema::compile(&v).unwrap_err();
        assert!(refuse(serde_json::json!({"type": "string", "pattern": "^a"})).contains("\"pattern\""));
        assert!(refuse(serde_json::json!({"anyOf": []})).contains("\"anyOf\""));
        assert!(refuse(serde_json::json!({"type": ["string", "null"]})).contains("one name"));
        assert!(refuse(serde_json::json!({"enum": [1, 2]})).contains("strings"));
        assert!(refuse(serde_json::json!({"type": "object", "additionalProperties": true})).contains("false"));
        let missing = serde_json::json!({"type": "object", "properties": {}, "required": ["x"]});
        assert!(refuse(missing).contains("not among"));
    }
}
