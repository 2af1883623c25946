//! YAML deserialisation with errors a user can act on: the file, the line and
//! column, and what was expected there.

use std::fmt;

/// A problem at a place in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocatedError {
    pub file: String,
    /// 1-based; 0 when the parser could not tell.
    pub line: u64,
    /// 1-based; 0 when the parser could not tell.
    pub column: u64,
    pub message: String,
}

impl fmt::Display for LocatedError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

impl std::error::Error for LocatedError {}

impl LocatedError {
    pub fn new(file: &str, line: u64, column: u64, message: impl Into<String>) -> Self {
        Self {
            file: file.to_owned(),
            line,
            column,
            message: message.into(),
        }
    }
}

/// Parses `text` (the content of `file`) into `T`.
pub fn from_str<T: serde::de::DeserializeOwned>(file: &str, text: &str) -> Result<T, LocatedError> {
    serde_saphyr::from_str::<T>(text).map_err(|e| {
        let (line, column) = e
            .location()
            .map(|l| (l.line(), l.column()))
            .unwrap_or((0, 0));
        LocatedError::new(file, line, column, clean_message(&e.to_string()))
    })
}

/// serde-saphyr appends its own " at line X column Y" and sometimes a source
/// snippet; keep the first line without the position, since we add ours.
fn clean_message(msg: &str) -> String {
    let mut first = msg.lines().next().unwrap_or(msg).trim();
    first = first.strip_prefix("error: ").unwrap_or(first);
    // "line 5 column 10: what" -> "what"
    if first.starts_with("line ")
        && let Some((_, rest)) = first.split_once(": ")
    {
        first = rest;
    }
    let message = match first.find(" at line ") {
        Some(i) => first[..i].trim_end_matches(','),
        None => first,
    };
    match did_you_mean(message) {
        Some(name) => format!("{message}; did you mean `{name}`?"),
        None => message.to_owned(),
    }
}
/// For an "unknown field `x`, expected one of a, b" error: the expected
/// name closest to `x`, when it is close enough to be a typo.
fn did_you_mean(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    let (unknown, _) = rest.split_once('`')?;
    let best = expected_names(message)
        .into_iter()
        .map(|name| (edit_distance(unknown, &name), name))
        .min()?;
    let limit = (unknown.chars().count() / 3).max(1);
    (best.0 <= limit).then_some(best.1)
}

/// The names an "unknown field" (or "unknown variant") error says were
/// expected, in its order: `expected one of a, b, c`, `expected a or b`,
/// with or without backticks.
pub fn expected_names(message: &str) -> Vec<String> {
    let Some((_, expected)) = message.split_once(", expected ") else {
        return Vec::new();
    };
    let expected = expected.strip_prefix("one of ").unwrap_or(expected);
    let expected = expected.split(';').next().unwrap_or_default();
    expected
        .split(", ")
        .flat_map(|part| part.split(" or "))
        .map(|name| name.trim().trim_matches('`').to_owned())
        .filter(|name| !name.is_empty() && !name.contains(' '))
        .collect()
}

/// Edit distance over characters, where swapping two neighbours is one
/// edit (optimal string alignment).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
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

/// A value with the place it was written, for errors found after parsing.
pub use serde_saphyr::Spanned;

/// A located error at the place `spanned` was defined.
pub fn error_at<T>(file: &str, spanned: &Spanned<T>, message: impl Into<String>) -> LocatedError {
    LocatedError::new(
        file,
        spanned.defined.line(),
        spanned.defined.column(),
        message,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misspelt_key_gets_the_closest_known_one() {
        assert_eq!(
            clean_message(
                "unknown field `dockerfil`, expected one of dockerfile, context, target, args at line 2 column 3"
            ),
            "unknown field `dockerfil`, expected one of dockerfile, context, target, args; did you mean `dockerfile`?"
        );
        assert_eq!(
            did_you_mean("unknown field `tset`, expected `image` or `test`").as_deref(),
            Some("test")
        );
    }

    #[test]
    fn no_suggestion_for_a_key_unlike_any() {
        assert_eq!(
            did_you_mean("unknown field `deploy`, expected `image` or `test`"),
            None
        );
        assert_eq!(did_you_mean("invalid type: string, expected u64"), None);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("tset", "test"), 1);
        assert_eq!(
            expected_names("unknown field `zzz`, expected one of version, image, test"),
            ["version", "image", "test"]
        );
    }
}
