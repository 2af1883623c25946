//! Masking a project's secrets in build logs: every stored (and so every
//! streamed) line shows `[MASKED]` where a secret's value was printed —
//! plainly, base64-encoded (standard or URL-safe alphabet, with or without
//! padding, and each line of the standard form wrapped at 64 or 76 columns)
//! or URL-encoded (percent-encoding with upper or lower hex digits, `+` for
//! spaces, and as Python's `quote` and JavaScript's `encodeURIComponent`
//! write it) — also when the value arrives split across two chunks of
//! output. Other encodings, and the base64 of a value inside a longer text
//! (`user:secret` in Basic auth), are not recognised.
//!
//! The writer feeds each chunk of a step's stream through [`Masker::feed`].
//! Output that could be the beginning of a secret is held back until the
//! next chunk of the same stream shows whether it is (or until
//! [`Masker::finish`]), so a value printed in two writes is still masked.
//! Values shorter than [`MIN_LEN`] are refused by the configuration: they
//! would mask ordinary text.

use std::collections::HashMap;

/// What a secret becomes in the log.
pub const MASK: &[u8] = b"[MASKED]";
/// The shortest value that can be masked.
pub const MIN_LEN: usize = 8;

/// Masks a set of secret values in several streams of output.
pub struct Masker {
    /// Every form of every value, longest first.
    patterns: Vec<Vec<u8>>,
    /// Whether a byte starts some pattern (a fast path for the rest).
    starts: [bool; 256],
    /// Output of each (step, stream) held back as a possible secret's start.
    held: HashMap<(String, &'static str), Vec<u8>>,
}

impl Masker {
    /// A masker of `values` (empty values are ignored).
    pub fn new<'a>(values: impl IntoIterator<Item = &'a str>) -> Self {
        let mut patterns: Vec<Vec<u8>> = Vec::new();
        for value in values.into_iter().filter(|v| !v.is_empty()) {
            for form in forms(value) {
                if !form.is_empty() && !patterns.contains(&form) {
                    patterns.push(form);
                }
            }
        }
        patterns.sort_by_key(|p| std::cmp::Reverse(p.len()));
        let mut starts = [false; 256];
        for p in &patterns {
            starts[p[0] as usize] = true;
        }
        Self {
            patterns,
            starts,
            held: HashMap::new(),
        }
    }

    /// Whether there is nothing to mask.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The masked output of a chunk of `step`'s `stream`; may hold back its
    /// end until more of the same stream comes.
    pub fn feed(&mut self, step: &str, stream: &'static str, data: &[u8]) -> Vec<u8> {
        if self.is_empty() {
            return data.to_vec();
        }
        let key = (step.to_owned(), stream);
        let mut buf = self.held.remove(&key).unwrap_or_default();
        buf.extend_from_slice(data);
        let (out, used) = self.scan(&buf, false);
        if used < buf.len() {
            self.held.insert(key, buf[used..].to_vec());
        }
        out
    }

    /// A whole message (nothing is held back).
    pub fn mask(&self, data: &[u8]) -> Vec<u8> {
        if self.is_empty() {
            return data.to_vec();
        }
        self.scan(data, true).0
    }

    /// Everything held back, per (step, stream), masked: the output has ended.
    pub fn finish(&mut self) -> Vec<(String, &'static str, Vec<u8>)> {
        let held = std::mem::take(&mut self.held);
        let mut out: Vec<_> = held
            .into_iter()
            .map(|((step, stream), data)| (step, stream, self.mask(&data)))
            .collect();
        out.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        out
    }

    /// Masks `buf` from its start; returns the output and how much of `buf`
    /// it covers. Unless `at_end`, it stops where a pattern might begin
    /// but `buf` ends before it could be told.
    fn scan(&self, buf: &[u8], at_end: bool) -> (Vec<u8>, usize) {
        let mut out = Vec::with_capacity(buf.len());
        let mut i = 0;
        'bytes: while i < buf.len() {
            if self.starts[buf[i] as usize] {
                let rest = &buf[i..];
                if !at_end
                    && self
                        .patterns
                        .iter()
                        .any(|p| p.len() > rest.len() && p.starts_with(rest))
                {
                    // Maybe a longer secret: wait for the rest of it.
                    break 'bytes;
                }
                if let Some(p) = self.patterns.iter().find(|p| rest.starts_with(p)) {
                    out.extend_from_slice(MASK);
                    i += p.len();
                    continue 'bytes;
                }
            }
            out.push(buf[i]);
            i += 1;
        }
        (out, i)
    }
}

/// The forms of a value that are masked.
fn forms(value: &str) -> Vec<Vec<u8>> {
    let bytes = value.as_bytes();
    let std = base64(bytes, STANDARD);
    let url = base64(bytes, URL_SAFE);
    let mut forms = vec![
        bytes.to_vec(),
        std.clone().into_bytes(),
        std.trim_end_matches('=').as_bytes().to_vec(),
        url.clone().into_bytes(),
        url.trim_end_matches('=').as_bytes().to_vec(),
        percent(bytes, false, b"").into_bytes(),
        percent(bytes, true, b"").into_bytes(),
        percent_lower(bytes).into_bytes(),
        // Python's `quote` keeps `/`; JavaScript's `encodeURIComponent`
        // keeps `!*'()`.
        percent(bytes, false, b"/").into_bytes(),
        percent(bytes, false, b"!*'()").into_bytes(),
    ];
    // `base64` wraps at 76 columns, `openssl base64` at 64: each line of a
    // long value's encoding is masked on its own.
    for width in [64, 76] {
        if std.len() > width {
            for line in std.as_bytes().chunks(width) {
                if line.len() >= MIN_LEN {
                    forms.push(line.to_vec());
                }
            }
        }
    }
    forms
}

const STANDARD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const URL_SAFE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn base64(data: &[u8], alphabet: &[u8; 64]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(alphabet[((n >> (18 - 6 * k)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Percent-encoding of everything but RFC 3986's unreserved characters
/// and `keep`; with `form`, a space is `+` (as HTML forms and query strings
/// write it).
fn percent(data: &[u8], form: bool, keep: &[u8]) -> String {
    let mut out = String::new();
    for &b in data {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ if keep.contains(&b) => out.push(b as char),
            b' ' if form => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Percent-encoding with lowercase hex digits (some encoders write those).
fn percent_lower(data: &[u8]) -> String {
    let mut out = String::new();
    for &b in data {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02x}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "s3cr3t value/42!";

    fn masked(text: &str) -> String {
        let mut m = Masker::new([SECRET]);
        let mut out = m.feed("unit", "stdout", text.as_bytes());
        for (_, _, rest) in m.finish() {
            out.extend(rest);
        }
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn every_form_is_masked() {
        assert_eq!(masked(&format!("token={SECRET}\n")), "token=[MASKED]\n");
        // base64 -w0 of the value, with and without padding, both alphabets.
        assert_eq!(
            base64(SECRET.as_bytes(), STANDARD),
            "czNjcjN0IHZhbHVlLzQyIQ=="
        );
        assert_eq!(masked("czNjcjN0IHZhbHVlLzQyIQ==\n"), "[MASKED]\n");
        assert_eq!(masked("x czNjcjN0IHZhbHVlLzQyIQ y"), "x [MASKED] y");
        assert_eq!(masked("s3cr3t%20value%2F42%21"), "[MASKED]");
        assert_eq!(masked("s3cr3t+value%2F42%21"), "[MASKED]");
        assert_eq!(masked("s3cr3t%20value%2f42%21"), "[MASKED]");
        assert_eq!(masked("nothing secret here"), "nothing secret here");
        // Python's quote() and JavaScript's encodeURIComponent().
        assert_eq!(masked("s3cr3t%20value/42%21"), "[MASKED]");
        assert_eq!(masked("s3cr3t%20value%2F42!"), "[MASKED]");
    }

    #[test]
    fn a_wrapped_base64_of_a_long_value_is_masked_line_by_line() {
        let long = "a-long-secret-".repeat(8);
        let encoded = base64(long.as_bytes(), STANDARD);
        let mut m = Masker::new([long.as_str()]);
        for width in [64, 76] {
            let wrapped: Vec<String> = encoded
                .as_bytes()
                .chunks(width)
                .map(|l| String::from_utf8_lossy(l).into_owned())
                .collect();
            let mut out = m.feed(
                "s",
                "stdout",
                format!("{}\n", wrapped.join("\n")).as_bytes(),
            );
            for (_, _, rest) in m.finish() {
                out.extend(rest);
            }
            let text = String::from_utf8_lossy(&out);
            for line in &wrapped {
                if line.len() >= MIN_LEN {
                    assert!(!text.contains(line.as_str()), "{width}: {text}");
                }
            }
        }
    }

    #[test]
    fn a_value_split_across_chunks_is_masked() {
        let mut m = Masker::new([SECRET]);
        let mut out = m.feed("unit", "stdout", b"before s3cr3t va");
        // The possible start is held back, other streams are not affected.
        assert_eq!(out, b"before ");
        assert_eq!(m.feed("unit", "stderr", b"err s3"), b"err ");
        out.extend(m.feed("unit", "stdout", b"lue/42! after"));
        assert_eq!(String::from_utf8_lossy(&out), "before [MASKED] after");
        // A held start that turns out not to be the secret is let out.
        let rest = m.finish();
        assert_eq!(rest, vec![("unit".to_owned(), "stderr", b"s3".to_vec())]);
    }

    #[test]
    fn byte_by_byte_output_is_masked() {
        let mut m = Masker::new([SECRET]);
        let mut out = Vec::new();
        for b in format!("a {SECRET} b").bytes() {
            out.extend(m.feed("unit", "stdout", &[b]));
        }
        for (_, _, rest) in m.finish() {
            out.extend(rest);
        }
        assert_eq!(String::from_utf8_lossy(&out), "a [MASKED] b");
    }

    #[test]
    fn a_longer_secret_is_not_cut_by_a_shorter_one() {
        let mut m = Masker::new(["password1", "password123"]);
        let mut out = m.feed("s", "stdout", b"password12");
        out.extend(m.feed("s", "stdout", b"3 end"));
        for (_, _, rest) in m.finish() {
            out.extend(rest);
        }
        assert_eq!(String::from_utf8_lossy(&out), "[MASKED] end");
    }

    #[test]
    fn no_secrets_no_change() {
        let mut m = Masker::new(Vec::<&str>::new());
        assert!(m.is_empty());
        assert_eq!(m.feed("s", "stdout", b"abc"), b"abc");
    }
}
