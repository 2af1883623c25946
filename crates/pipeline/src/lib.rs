//! The pipeline file, `.gantry.yml`, as the builder reads it and as
//! `gantry lint` checks it: one parser, one set of messages (file, line,
//! column, what was expected, and the closest known key for a misspelt one).
//!
//! - [`service`]: the file of a service repository (`image`, `test`).
//! - [`filter`]: when its pipeline runs (`only`, `except`).
//! - [`stack`]: the `stack:` section of a stack repository's file.

use std::path::{Component, Path};

use gantry_config::yaml::{LocatedError, Spanned, error_at};

pub mod filter;
pub mod service;
pub mod stack;

pub use service::PipelineFile;
pub use stack::StackFile;

/// The file name, at the repository root.
pub const FILE: &str = ".gantry.yml";

/// The `version:` of a `.gantry.yml`, when given, must be 1.
pub fn check_version(version: Option<&Spanned<u32>>) -> Result<(), LocatedError> {
    match version {
        Some(v) if v.value != 1 => Err(error_at(
            FILE,
            v,
            format!("unsupported version {}; expected 1", v.value),
        )),
        _ => Ok(()),
    }
}

/// A relative path that stays inside the repository.
pub fn inside_repo(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty()
        && !path.is_absolute()
        && path
            .components()
            .all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

/// A number of seconds written as `key`: positive, else `default` when absent.
pub(crate) fn seconds(
    value: Option<&Spanned<u64>>,
    key: &str,
    default: std::time::Duration,
) -> Result<std::time::Duration, LocatedError> {
    match value {
        Some(v) if v.value == 0 => Err(error_at(
            FILE,
            v,
            format!("{key} must be a positive number of seconds"),
        )),
        Some(v) => Ok(std::time::Duration::from_secs(v.value)),
        None => Ok(default),
    }
}

/// A checked `.gantry.yml`: of a service, or of a stack (it has `stack:`).
#[derive(Debug, Clone)]
pub enum Checked {
    Service(PipelineFile),
    Stack(StackFile),
}

/// Checks the text of a `.gantry.yml` as the builder would, choosing the
/// kind of file by its top-level `stack:` key.
pub fn check(text: &str) -> Result<Checked, LocatedError> {
    #[derive(serde::Deserialize)]
    struct Top {
        #[serde(default)]
        stack: Option<serde::de::IgnoredAny>,
    }
    let top: Result<Top, _> = gantry_config::yaml::from_str(FILE, text);
    if top.is_ok_and(|t| t.stack.is_some()) {
        StackFile::parse(text).map(Checked::Stack)
    } else {
        PipelineFile::parse(text).map(Checked::Service)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The keys the parser knows at one place: read from its answer to an
    /// unknown key there.
    fn known_keys(error: LocatedError) -> BTreeSet<String> {
        let names = gantry_config::yaml::expected_names(&error.message);
        assert!(!names.is_empty(), "not an unknown-key error: {error}");
        names.into_iter().collect()
    }

    fn schema_keys(schema: &serde_json::Value, pointer: &str) -> BTreeSet<String> {
        schema
            .pointer(pointer)
            .and_then(|p| p.as_object())
            .unwrap_or_else(|| panic!("schema has no {pointer}"))
            .keys()
            .cloned()
            .collect()
    }

    /// The published JSON Schema and the parser know the same keys at every
    /// level, so an editor flags exactly what the builder refuses.
    #[test]
    fn the_json_schema_knows_the_keys_the_parser_knows() {
        let text = include_str!("../../../schemas/gantry.schema.json");
        let schema: serde_json::Value = serde_json::from_str(text).expect("schema is JSON");
        let service_top = known_keys(PipelineFile::parse("zzz: 1\n").expect_err("unknown key"));
        let stack_top =
            known_keys(StackFile::parse("stack: {tests: [a]}\nzzz: 1\n").expect_err("unknown key"));
        let top: BTreeSet<String> = service_top.union(&stack_top).cloned().collect();
        assert_eq!(top, schema_keys(&schema, "/properties"));
        assert_eq!(
            known_keys(PipelineFile::parse("image:\n  zzz: 1\n").expect_err("unknown key")),
            schema_keys(&schema, "/properties/image/properties")
        );
        assert_eq!(
            known_keys(
                PipelineFile::parse("test:\n  - name: a\n    run: b\n    zzz: 1\n")
                    .expect_err("unknown key")
            ),
            schema_keys(&schema, "/properties/test/items/properties")
        );
        assert_eq!(
            known_keys(
                StackFile::parse("stack:\n  tests: [a]\n  zzz: 1\n").expect_err("unknown key")
            ),
            schema_keys(&schema, "/properties/stack/properties")
        );
        assert_eq!(
            known_keys(
                PipelineFile::parse("services:\n  - image: a/b\n    zzz: 1\n")
                    .expect_err("unknown key")
            ),
            schema_keys(&schema, "/properties/services/items/properties")
        );
        assert_eq!(
            known_keys(PipelineFile::parse("only:\n  zzz: 1\n").expect_err("unknown key")),
            schema_keys(&schema, "/$defs/filter/properties")
        );
    }

    #[test]
    fn check_tells_a_stack_file_from_a_service_file() {
        assert!(matches!(
            check("stack:\n  tests: [e2e]\n"),
            Ok(Checked::Stack(_))
        ));
        assert!(matches!(
            check("image: {}\ntest: []\n"),
            Ok(Checked::Service(_))
        ));
        // A broken file is reported as the service parser sees it.
        let e = check("image:\n  dockerfil: x\n").expect_err("unknown key");
        assert_eq!(e.line, 2);
    }
}
