//! QMP's wire framing: input is a stream of JSON values (a value may span reads, several may
//! share one), output is one JSON object per CRLF-terminated line, in ASCII.
//!
//! Like QEMU's json-streamer, [`JsonFramer`] finds where each top-level value ends by counting
//! braces and brackets outside strings, so a malformed value costs one error reply and the next
//! one parses normally. It also accepts QEMU's extension of `'single-quoted'` strings and the
//! `\'` escape. A lexical error (a control character other than tab, CR, LF, or a 0xFF byte)
//! discards the pending input: that is how the spec tells clients to resynchronise.

use std::io;

use serde::Serialize;
use serde_json::Value;

/// Deepest nesting of arrays and objects accepted (serde_json's own limit is 128).
const MAX_NESTING: u32 = 100;

/// One framed input value, or why the bytes consumed could not be one.
#[derive(Debug, PartialEq)]
pub(crate) enum Frame {
    /// A complete, parsed JSON value.
    Value(Value),
    /// A syntax or lexical error, with QEMU-style text (`JSON parse error, ...`).
    Error(String),
}

/// Incremental splitter of a byte stream into top-level JSON values.
#[derive(Debug, Default)]
pub(crate) struct JsonFramer {
    /// How far `buf` has been scanned.
    pos: usize,
    /// Open braces + brackets.
    depth: u32,
    /// The quote character of the string being scanned.
    quote: Option<u8>,
    escape: bool,
    /// Where the current value starts.
    start: Option<usize>,
    /// The current value is a bare scalar (number, keyword) at top level.
    scalar: bool,
    /// The current value uses single quotes or `\'`: it must be rewritten for serde_json.
    needs_rewrite: bool,
}

impl JsonFramer {
    /// Takes the next complete value (or error) off the front of `buf`, or `None` if more bytes
    /// are needed. Consumed bytes are removed from `buf`.
    pub(crate) fn next(&mut self, buf: &mut Vec<u8>) -> Option<Frame> {
        while self.pos < buf.len() {
            let i = self.pos;
            let b = buf[i];
            self.pos += 1;
            if let Some(q) = self.quote {
                if self.escape {
                    self.escape = false;
                    if b == b'\'' {
                        self.needs_rewrite = true;
                    }
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == q {
                    self.quote = None;
                    if self.depth == 0 {
                        return Some(self.emit(buf, i + 1));
                    }
                } else if b < 0x20 || b == 0xff {
                    return Some(self.lex_error(buf, i));
                }
                continue;
            }
            if self.scalar
                && matches!(
                    b,
                    b' ' | b'\t' | b'\r' | b'\n' | b'{' | b'[' | b'}' | b']' | b'"' | b'\''
                )
            {
                // The bare scalar ends before this byte, which is scanned again.
                self.pos = i;
                return Some(self.emit(buf, i));
            }
            match b {
                b' ' | b'\t' | b'\r' | b'\n' => {
                    if self.start.is_none() {
                        // Leading whitespace is dropped so it never counts as a partial request.
                        buf.drain(..=i);
                        self.pos = 0;
                    }
                }
                b'"' | b'\'' => {
                    self.quote = Some(b);
                    if b == b'\'' {
                        self.needs_rewrite = true;
                    }
                    self.start.get_or_insert(i);
                }
                b'{' | b'[' => {
                    self.start.get_or_insert(i);
                    self.depth += 1;
                    if self.depth > MAX_NESTING {
                        let r = Frame::Error("JSON nesting depth limit exceeded".into());
                        self.reset(buf, i + 1);
                        return Some(r);
                    }
                }
                b'}' | b']' => {
                    if self.depth == 0 {
                        self.reset(buf, i + 1);
                        return Some(Frame::Error("JSON parse error, expecting value".into()));
                    }
                    self.depth -= 1;
                    if self.depth == 0 {
                        return Some(self.emit(buf, i + 1));
                    }
                }
                0x00..=0x1f | 0xff => return Some(self.lex_error(buf, i)),
                _ => {
                    if self.start.is_none() {
                        self.start = Some(i);
                        self.scalar = true;
                    }
                }
            }
        }
        None
    }

    /// Whether a value has been started but not finished.
    #[cfg(test)]
    pub(crate) fn in_value(&self) -> bool {
        self.start.is_some()
    }

    fn lex_error(&mut self, buf: &mut Vec<u8>, i: usize) -> Frame {
        let b = buf[i];
        self.reset(buf, i + 1);
        let shown = if b.is_ascii() {
            (b as char).to_string()
        } else {
            format!("\\x{b:02x}")
        };
        Frame::Error(format!("JSON parse error, stray '{shown}'"))
    }

    fn reset(&mut self, buf: &mut Vec<u8>, end: usize) {
        buf.drain(..end);
        *self = JsonFramer::default();
    }

    fn emit(&mut self, buf: &mut Vec<u8>, end: usize) -> Frame {
        let start = self.start.unwrap_or(0);
        let parsed = if self.needs_rewrite {
            serde_json::from_slice::<Value>(&rewrite_quotes(&buf[start..end]))
        } else {
            serde_json::from_slice::<Value>(&buf[start..end])
        };
        self.reset(buf, end);
        match parsed {
            Ok(v) => Frame::Value(v),
            Err(e) => Frame::Error(format!("JSON parse error, {}", error_text(&e))),
        }
    }
}

/// serde_json's message without its " at line L column C" suffix.
fn error_text(e: &serde_json::Error) -> String {
    let s = e.to_string();
    match s.find(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Rewrites QEMU's JSON extensions into standard JSON: `'single-quoted'` strings become
/// double-quoted (escaping the `"` they contain) and `\'` becomes `'`.
fn rewrite_quotes(src: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(src.len() + 8);
    let mut quote: Option<u8> = None;
    let mut it = src.iter().copied();
    while let Some(b) = it.next() {
        match quote {
            None => {
                if b == b'"' || b == b'\'' {
                    quote = Some(b);
                    out.push(b'"');
                } else {
                    out.push(b);
                }
            }
            Some(q) => {
                if b == b'\\' {
                    match it.next() {
                        Some(b'\'') => out.push(b'\''),
                        Some(n) => out.extend_from_slice(&[b'\\', n]),
                        None => out.push(b'\\'),
                    }
                } else if b == q {
                    quote = None;
                    out.push(b'"');
                } else if b == b'"' {
                    out.extend_from_slice(b"\\\"");
                } else {
                    out.push(b);
                }
            }
        }
    }
    out
}

/// A serde_json formatter that escapes every non-ASCII character (`\uXXXX`, with surrogate
/// pairs): the spec says the server's output is ASCII.
struct AsciiFormatter;

impl serde_json::ser::Formatter for AsciiFormatter {
    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        for c in fragment.chars() {
            if c.is_ascii() {
                writer.write_all(&[c as u8])?;
            } else {
                let mut units = [0u16; 2];
                for u in c.encode_utf16(&mut units) {
                    write!(writer, "\\u{u:04x}")?;
                }
            }
        }
        Ok(())
    }
}

/// Appends `value` as one ASCII JSON line terminated by CRLF.
pub(crate) fn write_line<T: Serialize>(out: &mut Vec<u8>, value: &T) {
    let mut ser = serde_json::Serializer::with_formatter(&mut *out, AsciiFormatter);
    // Serializing a `Value` or our own plain structs into a Vec cannot fail.
    let _ = value.serialize(&mut ser);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn frames(input: &[u8]) -> (Vec<Frame>, Vec<u8>) {
        let mut f = JsonFramer::default();
        let mut buf = input.to_vec();
        let mut got = Vec::new();
        while let Some(fr) = f.next(&mut buf) {
            got.push(fr);
        }
        (got, buf)
    }

    #[test]
    fn several_values_in_one_read() {
        let (got, rest) = frames(b"{\"a\": 1}{\"b\": [2, {\"c\": \"}\"}]}\r\n {\"d\"");
        assert_eq!(
            got,
            vec![
                Frame::Value(json!({"a": 1})),
                Frame::Value(json!({"b": [2, {"c": "}"}]}))
            ]
        );
        assert_eq!(rest, b"{\"d\"");
    }

    #[test]
    fn a_value_split_across_reads() {
        let mut f = JsonFramer::default();
        let mut buf = b"{\"execute\": \"qu".to_vec();
        assert_eq!(f.next(&mut buf), None);
        assert!(f.in_value());
        buf.extend_from_slice(b"it\\\"\"}");
        assert_eq!(
            f.next(&mut buf),
            Some(Frame::Value(json!({"execute": "quit\""})))
        );
        assert!(buf.is_empty());
        assert!(!f.in_value());
    }

    #[test]
    fn malformed_value_then_recovery() {
        let (got, _) = frames(b"{ \"execute\": }{\"execute\": \"x\"}");
        assert_eq!(
            got[0],
            Frame::Error("JSON parse error, expected value".into())
        );
        assert_eq!(got[1], Frame::Value(json!({"execute": "x"})));
    }

    #[test]
    fn single_quotes_and_escaped_quote() {
        let (got, _) = frames(b"{'execute': 'a\\'b\"c', \"x\": \"it\\'s\"}");
        assert_eq!(
            got,
            vec![Frame::Value(json!({"execute": "a'b\"c", "x": "it's"}))]
        );
    }

    #[test]
    fn control_character_resynchronises() {
        let (got, rest) = frames(b"{\"execute\": \x01 {\"a\":1}");
        assert_eq!(
            got[0],
            Frame::Error("JSON parse error, stray '\x01'".into())
        );
        assert_eq!(got[1], Frame::Value(json!({"a": 1})));
        assert!(rest.is_empty());
        let (got, _) = frames(b"{\"x\xff");
        assert_eq!(
            got[0],
            Frame::Error("JSON parse error, stray '\\xff'".into())
        );
    }

    #[test]
    fn top_level_scalars_and_stray_closers() {
        let (got, _) = frames(b"42 \"s\" true}[1]");
        assert_eq!(
            got,
            vec![
                Frame::Value(json!(42)),
                Frame::Value(json!("s")),
                Frame::Value(json!(true)),
                Frame::Error("JSON parse error, expecting value".into()),
                Frame::Value(json!([1])),
            ]
        );
        let (got, _) = frames(b"nonsense ");
        assert!(matches!(&got[0], Frame::Error(e) if e.starts_with("JSON parse error")));
    }

    #[test]
    fn nesting_is_bounded() {
        let deep = "[".repeat(200);
        let (got, _) = frames(deep.as_bytes());
        assert_eq!(
            got[0],
            Frame::Error("JSON nesting depth limit exceeded".into())
        );
    }

    #[test]
    fn whitespace_alone_is_not_kept() {
        let (got, rest) = frames(b"  \r\n\t ");
        assert!(got.is_empty());
        assert!(rest.is_empty());
    }

    #[test]
    fn output_is_ascii_and_crlf_terminated() {
        let mut out = Vec::new();
        write_line(&mut out, &json!({"id": "é😀"}));
        assert_eq!(out, b"{\"id\":\"\\u00e9\\ud83d\\ude00\"}\r\n");
        let back: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(back, json!({"id": "é😀"}));
    }
}
