//! JSON, byte by byte: the automaton that constrained decoding asks "may
//! this token come next?" ([`crate::Generator::generate`] with
//! [`mycel_protocol::OutputFormat::JsonObject`]).
//!
//! It follows RFC 8259's grammar over bytes (inside strings any byte from
//! 0x20 up passes, so UTF-8 text does), keeps a stack of open containers,
//! and knows the shortest way to close what is open ([`Json::completion`]),
//! so a generation running out of tokens can still end in valid JSON.
//! Runs of whitespace between tokens are capped ([`MAX_WHITESPACE`]): a
//! small model under a JSON constraint otherwise likes to emit newlines
//! until its budget is gone.

/// Longest run of whitespace allowed between JSON tokens, in bytes: deep
/// pretty-printed indentation fits; an endless run of newlines does not.
pub const MAX_WHITESPACE: u16 = 64;
/// Longest number, in bytes (an f64 needs at most 24).
const MAX_NUMBER: u8 = 32;

/// Where in a JSON text the bytes so far have left off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Json {
    stack: Vec<Container>,
    mode: Mode,
    whitespace: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Container {
    Object,
    Array,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// Inside a string.
    Str { key: bool, escape: Escape },
    /// Inside a number.
    Number { part: Num, length: u8 },
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

impl Json {
    /// Expects one JSON object (OpenAI's `json_object` mode).
    pub fn object() -> Self {
        Self { stack: Vec::new(), mode: Mode::Start, whitespace: 0 }
    }

    /// Whether the object is complete: nothing more may follow.
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

    /// Takes one byte; `false` if JSON does not allow it here (the state
    /// is then unspecified: see [`Self::push_all`]).
    fn push(&mut self, b: u8) -> bool {
        if let Mode::Number { part, length } = self.mode {
            match part.next(b) {
                Some(part) if length < MAX_NUMBER => {
                    self.mode = Mode::Number { part, length: length + 1 };
                    return true;
                }
                Some(_) => return false,
                None if part.complete() => self.mode = self.after_value(),
                None => return false,
            }
        }
        match self.mode {
            Mode::Str { key, escape } => return self.string(b, key, escape),
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
        match (self.mode, b) {
            (Mode::Start, b'{') => self.open(Container::Object),
            (Mode::Value | Mode::ArrayFirst, _) => self.value(b),
            (Mode::ObjectFirst | Mode::Key, b'"') => self.mode = Mode::Str { key: true, escape: Escape::None },
            (Mode::ObjectFirst, b'}') => self.close(),
            (Mode::Colon, b':') => self.mode = Mode::Value,
            (Mode::After, b',') => {
                self.mode = if self.stack.last() == Some(&Container::Object) { Mode::Key } else { Mode::Value }
            }
            (Mode::After, b'}') if self.stack.last() == Some(&Container::Object) => self.close(),
            (Mode::After, b']') if self.stack.last() == Some(&Container::Array) => self.close(),
            _ => return false,
        }
        self.mode != Mode::Start
    }

    /// The first byte of a value (or `]` closing an empty array). Leaves
    /// the mode at `Start` to say "refused".
    fn value(&mut self, b: u8) {
        let number = |part| Mode::Number { part, length: 1 };
        self.mode = match b {
            b'{' => return self.open(Container::Object),
            b'[' => return self.open(Container::Array),
            b']' if self.mode == Mode::ArrayFirst => return self.close(),
            b'"' => Mode::Str { key: false, escape: Escape::None },
            b'-' => number(Num::Minus),
            b'0' => number(Num::Zero),
            b'1'..=b'9' => number(Num::Int),
            b't' => Mode::Literal { rest: b"rue" },
            b'f' => Mode::Literal { rest: b"alse" },
            b'n' => Mode::Literal { rest: b"ull" },
            _ => Mode::Start,
        };
    }

    fn string(&mut self, b: u8, key: bool, escape: Escape) -> bool {
        let escape = match (escape, b) {
            (Escape::None, b'"') => {
                self.mode = if key { Mode::Colon } else { self.after_value() };
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
        self.mode = Mode::Str { key, escape };
        true
    }

    fn open(&mut self, container: Container) {
        self.stack.push(container);
        self.mode = match container {
            Container::Object => Mode::ObjectFirst,
            Container::Array => Mode::ArrayFirst,
        };
    }

    fn close(&mut self) {
        self.stack.pop();
        self.mode = self.after_value();
    }

    fn after_value(&self) -> Mode {
        if self.stack.is_empty() { Mode::Done } else { Mode::After }
    }

    /// The shortest bytes that complete the JSON from here (empty once
    /// done): what a generation about to run out of tokens must emit.
    pub fn completion(&self) -> Vec<u8> {
        let mut state = self.clone();
        let mut out = Vec::new();
        while state.mode != Mode::Done {
            let b = match state.mode {
                Mode::Start => b'{',
                Mode::Value => b'0',
                Mode::ArrayFirst | Mode::ObjectFirst | Mode::After => match state.stack.last() {
                    Some(Container::Array) => b']',
                    _ => b'}',
                },
                Mode::Key => b'"',
                Mode::Colon => b':',
                Mode::Str { escape: Escape::None, .. } => b'"',
                Mode::Str { escape: Escape::Backslash, .. } => b'n',
                Mode::Str { escape: Escape::Unicode(_), .. } => b'0',
                Mode::Number { part, .. } if part.complete() => match state.stack.last() {
                    Some(Container::Array) => b']',
                    _ => b'}',
                },
                Mode::Number { .. } => b'0',
                Mode::Literal { rest } => rest[0],
                Mode::Done => break,
            };
            // The rules above only ever pick an allowed byte.
            let taken = state.push(b);
            debug_assert!(taken, "completion byte {b} refused in {:?}", state.mode);
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
}
