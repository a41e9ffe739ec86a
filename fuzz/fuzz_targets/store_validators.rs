//! The store's validators of untrusted text: SQL identifiers (`Ident::parse`, for
//! table and column names from config, peers and clients), ULIDs (`parse_ulid`),
//! version vectors and frontiers in JSON (`metadata.vv`), and the enumerations
//! (operation, conflict policy, conflict status).
//!
//! Properties: nothing panics; an accepted identifier is plain ASCII within
//! PostgreSQL's length limit, so double-quoting it is safe; an accepted ULID is the
//! canonical text of its value; accepted vectors, frontiers and enumerations
//! round-trip through their own serialised forms.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tidemark_store::ident::Ident;
use tidemark_store::model::parse_ulid;
use tidemark_store::{ConflictPolicy, ConflictStatus, Member, Operation, Version, VersionVector};

fn identifier(text: &str) {
    let Ok(ident) = Ident::parse("table", text) else {
        return;
    };
    assert_eq!(ident.as_str(), text);
    assert!(!text.is_empty() && text.len() <= 63, "length of {text:?}");
    assert!(
        text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'),
        "{text:?} holds a character that is not a letter, digit or _"
    );
    assert!(!text.as_bytes()[0].is_ascii_digit(), "{text:?} starts with a digit");
    let quoted = ident.quoted();
    assert_eq!(quoted, format!("\"{text}\""));
    assert_eq!(quoted.matches('"').count(), 2, "{quoted} must hold no quote of its own");
}

fn ulid(text: &str) {
    if let Ok(id) = parse_ulid("id", text) {
        assert_eq!(
            id.to_string(),
            text.to_ascii_uppercase(),
            "{text:?} was accepted as a ULID whose canonical text differs: two texts would name one id"
        );
    }
}

fn vector(v: &Value) {
    if let Ok(vv) = VersionVector::from_json(v, "metadata.vv") {
        let again = VersionVector::from_json(&vv.to_json(), "metadata.vv").expect("own JSON");
        assert_eq!(again, vv, "vector JSON round trip");
        let mut merged = vv.clone();
        merged.merge(&vv);
        assert_eq!(merged, vv, "merge is idempotent");
        assert!(vv.covers(&vv));
    }
}

fn frontier(v: &Value) {
    if let Ok(members) = Version::frontier_from_json(v) {
        let Some(last) = members.last().cloned() else {
            return;
        };
        let mut version = Version::single(last);
        version.frontier = members.clone();
        let again = Version::frontier_from_json(&version.frontier_json()).expect("own frontier");
        assert_eq!(again, members, "frontier JSON round trip");
        let _: Vec<_> = members.iter().map(Member::order).collect();
    }
}

fn enums(text: &str) {
    if let Ok(op) = text.parse::<Operation>() {
        assert_eq!(op.as_str(), text);
    }
    if let Ok(p) = text.parse::<ConflictPolicy>() {
        assert_eq!(p.as_str(), text);
    }
    if let Ok(s) = text.parse::<ConflictStatus>() {
        assert_eq!(s.as_str(), text);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&kind, body)) = data.split_first() else {
        return;
    };
    let Ok(text) = std::str::from_utf8(body) else {
        return;
    };
    match kind % 5 {
        0 => identifier(text),
        1 => ulid(text),
        2 => {
            if let Ok(v) = serde_json::from_str::<Value>(text) {
                vector(&v);
            }
        }
        3 => {
            if let Ok(v) = serde_json::from_str::<Value>(text) {
                frontier(&v);
            }
        }
        _ => enums(text),
    }
});
