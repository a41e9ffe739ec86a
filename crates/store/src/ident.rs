//! SQL identifiers that come from configuration or from the network. Every table
//! and column name that reaches SQL text passes through [`Ident::parse`] and is
//! checked against the live schema before use.

use std::fmt;

use crate::error::StoreError;

/// A validated SQL identifier: ASCII letter or underscore, then letters, digits or
/// underscores, at most 63 bytes (PostgreSQL's limit).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Ident(String);

impl Ident {
    pub fn parse(what: &str, name: &str) -> Result<Ident, StoreError> {
        let ok_start = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
        let ok_rest = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok_start || !ok_rest || name.len() > 63 {
            return Err(StoreError::invalid(
                what,
                format!(
                    "{:?} is not a plain SQL identifier (letters, digits and _, not starting with a digit, at most 63 bytes)",
                    crate::model::truncate(name)
                ),
            ));
        }
        Ok(Ident(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The identifier double-quoted for SQL text.
    pub fn quoted(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

impl fmt::Display for Ident {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Quotes a name already validated by [`Ident::parse`] (or read from the registry,
/// which only ever holds validated names).
pub(crate) fn q(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert!(Ident::parse("table", "notes").is_ok());
        assert!(Ident::parse("table", "_x1").is_ok());
        for bad in [
            "",
            "1abc",
            "a-b",
            "a b",
            "x\"; DROP TABLE y; --",
            "é",
            &"a".repeat(64),
        ] {
            let err = Ident::parse("table", bad).expect_err(bad).to_string();
            assert!(err.starts_with("invalid table:"), "{err}");
        }
    }
}
