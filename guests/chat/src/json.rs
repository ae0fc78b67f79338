//! JSON mode: an incremental checker of a JSON object's text, byte by byte, so that the
//! chat can choose only tokens that keep its answer a prefix of valid JSON (OpenAI's
//! `response_format: {"type": "json_object"}`), and know when the object is whole.
//!
//! The answer must be one object (`{...}`), whitespace around it allowed; nesting is at
//! most [`MAX_DEPTH`] deep and a run of whitespace at most [`MAX_SPACE`] bytes (so a model
//! cannot stall in blanks). Strings take any bytes but controls, `"` and `\` (escapes as
//! JSON's).

/// The deepest nesting of objects and arrays.
pub const MAX_DEPTH: usize = 32;
/// The longest run of whitespace.
pub const MAX_SPACE: u32 = 32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Num {
    /// After `-`.
    Minus,
    /// A leading `0`.
    Zero,
    /// Integer digits.
    Int,
    /// After `.`.
    Dot,
    /// Fraction digits.
    Frac,
    /// After `e`.
    E,
    /// After the exponent's sign.
    ESign,
    /// Exponent digits.
    Exp,
}

impl Num {
    /// Whether the number may end here.
    fn complete(self) -> bool {
        matches!(self, Num::Zero | Num::Int | Num::Frac | Num::Exp)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// Before the top-level object.
    Start,
    /// A value is due; `first` right after `[` (so `]` may come).
    Value { first: bool },
    /// A key is due; `first` right after `{` (so `}` may come).
    Key { first: bool },
    /// Inside a string (a key's when `key`).
    Str { key: bool },
    /// After `\` in a string.
    Escape { key: bool },
    /// `left` hex digits of a `\u` escape to go.
    Unicode { key: bool, left: u8 },
    /// Inside a number.
    Number(Num),
    /// Inside `true`, `false` or `null`: the bytes still due.
    Literal(&'static [u8]),
    /// After a key: `:` is due.
    Colon,
    /// After a value inside an object or array: `,` or the closer.
    After,
    /// The object is whole.
    Done,
}

/// Where a JSON object's text stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Json {
    mode: Mode,
    /// `{` or `[` for each open container.
    stack: Vec<u8>,
    /// Whitespace bytes in a row.
    space: u32,
}

impl Default for Json {
    fn default() -> Self {
        Json { mode: Mode::Start, stack: Vec::new(), space: 0 }
    }
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

impl Json {
    /// Whether the object is whole.
    pub fn done(&self) -> bool {
        self.mode == Mode::Done
    }

    /// The state after `bytes`, or `None` when they cannot continue valid JSON.
    pub fn feed(&self, bytes: &[u8]) -> Option<Json> {
        let mut j = self.clone();
        for &b in bytes {
            j.push(b)?;
        }
        Some(j)
    }

    /// After a value ends: what comes next.
    fn value_ended(&mut self) {
        self.mode = if self.stack.is_empty() { Mode::Done } else { Mode::After };
    }

    fn open(&mut self, b: u8) -> Option<()> {
        if self.stack.len() >= MAX_DEPTH {
            return None;
        }
        self.stack.push(b);
        self.mode = if b == b'{' { Mode::Key { first: true } } else { Mode::Value { first: true } };
        Some(())
    }

    fn close(&mut self, b: u8) -> Option<()> {
        let want = if b == b'}' { b'{' } else { b'[' };
        if self.stack.pop() != Some(want) {
            return None;
        }
        self.value_ended();
        Some(())
    }

    fn push(&mut self, b: u8) -> Option<()> {
        let spaced = matches!(
            self.mode,
            Mode::Start | Mode::Value { .. } | Mode::Key { .. } | Mode::Colon | Mode::After | Mode::Done
        );
        if spaced && is_space(b) {
            self.space += 1;
            return (self.space <= MAX_SPACE).then_some(());
        }
        self.space = 0;
        match self.mode {
            Mode::Start if b == b'{' => self.open(b)?,
            Mode::Start => return None,
            Mode::Done => return None,
            Mode::Value { first } => match b {
                b']' if first => self.close(b)?,
                b'{' | b'[' => self.open(b)?,
                b'"' => self.mode = Mode::Str { key: false },
                b'-' => self.mode = Mode::Number(Num::Minus),
                b'0' => self.mode = Mode::Number(Num::Zero),
                b'1'..=b'9' => self.mode = Mode::Number(Num::Int),
                b't' => self.mode = Mode::Literal(b"rue"),
                b'f' => self.mode = Mode::Literal(b"alse"),
                b'n' => self.mode = Mode::Literal(b"ull"),
                _ => return None,
            },
            Mode::Key { first } => match b {
                b'}' if first => self.close(b)?,
                b'"' => self.mode = Mode::Str { key: true },
                _ => return None,
            },
            Mode::Str { key } => match b {
                b'"' if key => self.mode = Mode::Colon,
                b'"' => self.value_ended(),
                b'\\' => self.mode = Mode::Escape { key },
                0..=0x1f => return None,
                _ => {}
            },
            Mode::Escape { key } => match b {
                b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => self.mode = Mode::Str { key },
                b'u' => self.mode = Mode::Unicode { key, left: 4 },
                _ => return None,
            },
            Mode::Unicode { key, left } => {
                if !b.is_ascii_hexdigit() {
                    return None;
                }
                self.mode = if left == 1 { Mode::Str { key } } else { Mode::Unicode { key, left: left - 1 } };
            }
            Mode::Number(n) => {
                let next = match (n, b) {
                    (Num::Minus, b'0') => Some(Num::Zero),
                    (Num::Minus, b'1'..=b'9') => Some(Num::Int),
                    (Num::Int, b'0'..=b'9') => Some(Num::Int),
                    (Num::Zero | Num::Int, b'.') => Some(Num::Dot),
                    (Num::Dot | Num::Frac, b'0'..=b'9') => Some(Num::Frac),
                    (Num::Zero | Num::Int | Num::Frac, b'e' | b'E') => Some(Num::E),
                    (Num::E, b'+' | b'-') => Some(Num::ESign),
                    (Num::E | Num::ESign | Num::Exp, b'0'..=b'9') => Some(Num::Exp),
                    _ => None,
                };
                match next {
                    Some(n) => self.mode = Mode::Number(n),
                    // The number ends here; the byte belongs to what follows it.
                    None if n.complete() => {
                        self.value_ended();
                        return self.push(b);
                    }
                    None => return None,
                }
            }
            Mode::Literal(rest) => {
                if rest.first() != Some(&b) {
                    return None;
                }
                if rest.len() == 1 {
                    self.value_ended();
                } else {
                    self.mode = Mode::Literal(&rest[1..]);
                }
            }
            Mode::Colon if b == b':' => self.mode = Mode::Value { first: false },
            Mode::Colon => return None,
            Mode::After => match (b, self.stack.last()) {
                (b',', Some(b'{')) => self.mode = Mode::Key { first: false },
                (b',', Some(b'[')) => self.mode = Mode::Value { first: false },
                (b'}' | b']', _) => self.close(b)?,
                _ => return None,
            },
        }
        Some(())
    }

    /// The shortest text that makes the object whole from here (empty when it is).
    pub fn closing(&self) -> Vec<u8> {
        let mut j = self.clone();
        let mut out = Vec::new();
        // Each byte below moves toward the end; the bound is only a guard.
        for _ in 0..(8 * MAX_DEPTH + 64) {
            let b = match j.mode {
                Mode::Done => break,
                Mode::Start => b'{',
                Mode::Value { first: true } => b']',
                Mode::Value { first: false } => b'0',
                Mode::Key { first: true } => b'}',
                Mode::Key { first: false } | Mode::Str { .. } => b'"',
                Mode::Escape { .. } => b'n',
                Mode::Unicode { .. } => b'0',
                Mode::Number(n) if n.complete() => {
                    if j.stack.last() == Some(&b'{') {
                        b'}'
                    } else {
                        b']'
                    }
                }
                Mode::Number(_) => b'0',
                Mode::Literal(rest) => rest[0],
                Mode::Colon => b':',
                Mode::After => {
                    if j.stack.last() == Some(&b'{') {
                        b'}'
                    } else {
                        b']'
                    }
                }
            };
            if j.push(b).is_none() {
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

    fn whole(s: &str) -> bool {
        Json::default().feed(s.as_bytes()).is_some_and(|j| j.done())
    }

    fn prefix(s: &str) -> bool {
        Json::default().feed(s.as_bytes()).is_some()
    }

    #[test]
    fn objects_are_checked_byte_by_byte() {
        for ok in [
            r#"{}"#,
            r#"{"a": 1}"#,
            r#" { "a" : [1, -2.5e+3, 0.0, true, false, null, "x\"\u00e9\n"], "b": {"c": []} } "#,
            "{\"k\":\"caf\u{e9}\"}",
        ] {
            assert!(whole(ok), "{ok}");
        }
        for bad in [r#"[1]"#, r#"{"a" 1}"#, r#"{"a": 01}"#, r#"{"a": tru}"#, r#"{,}"#, r#"{"a": [1,]}"#, "{\"a\n\"}"] {
            assert!(!whole(bad), "{bad}");
        }
        assert!(prefix(r#"{"a": [1, 2"#));
        assert!(!prefix(r#"{"a": ]"#));
        assert!(!prefix("x"));
        assert!(!prefix(r#"{"a": 1}}"#), "nothing after the object but whitespace");
        assert!(prefix("{\"a\": 1} \n"));
        assert!(!prefix(&format!("{{{}", " ".repeat(MAX_SPACE as usize + 1))), "whitespace is bounded");
        assert!(!prefix(&format!("{{\"a\":{}", "[".repeat(MAX_DEPTH))), "depth is bounded");
    }

    #[test]
    fn closing_makes_any_prefix_whole() {
        let text = r#"{"a": [1, -2.5e+3, {"b": "x\u00e9\"y"}, true, null], "c": {"d": fals"#;
        for cut in 0..=text.len() {
            let j = Json::default().feed(&text.as_bytes()[..cut]).expect("a prefix");
            let closed = j.feed(&j.closing()).expect("closing continues it");
            assert!(closed.done(), "{}", &text[..cut]);
        }
    }
}
