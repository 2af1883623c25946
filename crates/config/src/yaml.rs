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
    match first.find(" at line ") {
        Some(i) => first[..i].trim_end_matches(',').to_owned(),
        None => first.to_owned(),
    }
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
