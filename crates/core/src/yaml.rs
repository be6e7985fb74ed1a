//! Bounded YAML: how meshfed reads YAML that someone else holds (kubeconfig Secrets in the hub, remote secrets read
//! back from members).
//!
//! Such a document is data written by whoever may write Secrets there, so reading it must cost little whatever it
//! says: its size is capped before it is parsed, and the parser (serde-saphyr) runs with budgets on depth, nodes,
//! aliases and alias expansion, so that alias amplification ("billion laughs") is refused after a few thousand
//! events instead of growing to gigabytes. The errors name a kind and a position only, never a snippet of the
//! document: the document may hold a token or a private key, and errors end up in status, Events and logs.

use std::fmt;

use serde::de::DeserializeOwned;
use serde_saphyr::{Error, budget::BudgetBreach};

/// The largest YAML document meshfed parses from a Secret, in bytes. A kubeconfig with inline certificates is a few
/// KiB, one with a few dozen contexts some tens of KiB; a Secret can hold 1 MiB.
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;

/// The parser's budget for a document that someone else holds: generous for any kubeconfig (kubectl and meshfed
/// write no anchors at all), tight on what amplifies. An alias may not be expanded inside another expansion, and
/// there are at most 32 of them, so the expanded document is at most 33 times the size of the input.
fn options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_reader_input_bytes: Some(MAX_DOCUMENT_BYTES),
            max_events: 100_000,
            max_nodes: 50_000,
            max_depth: 32,
            max_documents: 8,
            max_aliases: 32,
            max_anchors: 32,
            max_total_scalar_bytes: MAX_DOCUMENT_BYTES,
            max_recorded_anchor_events: 10_000,
            max_recorded_anchor_bytes: MAX_DOCUMENT_BYTES,
            max_merge_keys: 32,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: 10_000,
            max_replay_stack_depth: 1,
            max_alias_expansions_per_anchor: 32,
        },
        with_snippet: false,
        crop_radius: 0,
    }
}

/// Why a document was not read. Its text names the kind of problem and where it is, and quotes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum YamlError {
    #[error("the document is {size} bytes, more than the {limit} bytes meshfed reads")]
    TooLarge { size: usize, limit: usize },
    #[error("the document is not UTF-8 text")]
    NotUtf8,
    #[error("{kind}{}", Position(*.position))]
    Invalid {
        kind: &'static str,
        /// Line and column (from 1), when the parser knows them.
        position: Option<(u64, u64)>,
    },
}

struct Position(Option<(u64, u64)>);

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some((line, column)) => write!(f, " at line {line} column {column}"),
            None => Ok(()),
        }
    }
}

/// Parses one document of at most [`MAX_DOCUMENT_BYTES`] within the budget.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, YamlError> {
    let text = std::str::from_utf8(capped(bytes)?).map_err(|_| YamlError::NotUtf8)?;
    serde_saphyr::from_str_with_options(text, options()).map_err(|e| redacted(&e))
}

/// Parses every document of a YAML stream of at most [`MAX_DOCUMENT_BYTES`] within the budget.
pub fn from_multiple<T: DeserializeOwned>(text: &str) -> Result<Vec<T>, YamlError> {
    let text = std::str::from_utf8(capped(text.as_bytes())?).map_err(|_| YamlError::NotUtf8)?;
    serde_saphyr::from_multiple_with_options(text, options()).map_err(|e| redacted(&e))
}

fn capped(bytes: &[u8]) -> Result<&[u8], YamlError> {
    if bytes.len() > MAX_DOCUMENT_BYTES {
        return Err(YamlError::TooLarge { size: bytes.len(), limit: MAX_DOCUMENT_BYTES });
    }
    Ok(bytes)
}

/// The kind and position of a parser error, and nothing of its text: serde's messages quote values ("invalid type:
/// string \"...\"") and the parser's quote the document around the error.
fn redacted(e: &Error) -> YamlError {
    let position = e.location().map(|l| (l.line(), l.column())).filter(|&(line, _)| line > 0);
    YamlError::Invalid { kind: kind(e), position }
}

fn kind(e: &Error) -> &'static str {
    match e {
        Error::WithSnippet { error, .. } | Error::AliasError { error, .. } => kind(error),
        Error::Budget { breach, .. } => match breach {
            BudgetBreach::Depth { .. } => "the document nests deeper than meshfed reads",
            BudgetBreach::Aliases { .. } | BudgetBreach::Anchors { .. } | BudgetBreach::AliasAnchorRatio { .. } => {
                "the document uses more aliases or anchors than meshfed reads"
            }
            BudgetBreach::Documents { .. } => "the stream has more documents than meshfed reads",
            _ => "the document is larger than meshfed reads",
        },
        Error::AliasReplayCounterOverflow { .. }
        | Error::AliasReplayLimitExceeded { .. }
        | Error::AliasExpansionLimitExceeded { .. }
        | Error::AliasReplayStackDepthExceeded { .. } => "the document expands aliases more than meshfed reads",
        Error::UnknownAnchor { .. } => "the document refers to an anchor it does not define",
        Error::DuplicateMappingKey { .. } => "the document repeats a key in one mapping",
        Error::SerdeInvalidType { .. }
        | Error::SerdeInvalidValue { .. }
        | Error::SerdeInvalidLength { .. }
        | Error::SerdeUnknownVariant { .. }
        | Error::SerdeUnknownField { .. }
        | Error::SerdeMissingField { .. }
        | Error::NullIntoString { .. } => "the document does not have the expected shape",
        Error::MultipleDocuments { .. } => "the stream has more than one document",
        Error::Eof { .. } => "the document ends too early",
        _ => "the document is not valid YAML",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn plain_documents_and_a_few_aliases_are_read() {
        let doc: BTreeMap<String, Vec<String>> = from_slice(b"a: &x [one, two]\nb: *x\n").unwrap();
        assert_eq!(doc["b"], ["one", "two"]);
    }

    #[test]
    fn a_document_over_the_cap_is_refused_before_parsing() {
        let big = vec![b'#'; MAX_DOCUMENT_BYTES + 1];
        let err = from_slice::<serde_json::Value>(&big).unwrap_err();
        assert_eq!(err, YamlError::TooLarge { size: MAX_DOCUMENT_BYTES + 1, limit: MAX_DOCUMENT_BYTES });
    }

    #[test]
    fn nested_alias_expansion_is_refused() {
        let mut doc = String::from("a: &a [x, x, x, x, x, x, x, x]\n");
        for (prev, name) in ["a", "b", "c", "d", "e", "f"].iter().zip(["b", "c", "d", "e", "f", "g"]) {
            doc.push_str(&format!("{name}: &{name} [*{prev}, *{prev}, *{prev}, *{prev}]\n"));
        }
        let err = from_slice::<serde_json::Value>(doc.as_bytes()).unwrap_err();
        assert!(matches!(err, YamlError::Invalid { .. }), "{err}");
    }

    #[test]
    fn errors_quote_nothing_of_the_document() {
        for doc in [
            "users: s3cr3t-token\n",                      // a type error: serde quotes the value
            "token: s3cr3t-token\ntoken: s3cr3t-token\n", // a duplicate key
            "a: *s3cr3t-token\n",                         // an unknown anchor
            "a: [s3cr3t-token\n",                         // a syntax error
            "a: 's3cr3t-token\n",
        ] {
            let err = from_slice::<BTreeMap<String, Vec<String>>>(doc.as_bytes()).unwrap_err();
            let text = err.to_string();
            assert!(!text.contains("s3cr3t"), "{doc:?}: {text}");
        }
    }
}
