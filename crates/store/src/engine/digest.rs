//! Digests of a table's rows, to compare nodes (`tidemark admin check`).
//!
//! A row's hash is SHA-256 of its record id, a newline, and its replicated values
//! in their canonical form (see [`crate::value`]) as one JSON object with sorted
//! keys; a range's digest is SHA-256 of its rows' hashes in id order. Canonical
//! values are the same on every backend, so equal rows give equal digests on
//! SQLite, PostgreSQL and in memory. Record ids are ULIDs: a range `[from, to)`
//! of them is split evenly over the 128-bit id space, the same way on every
//! node, so two nodes' answers for one range compare part by part.
//!
//! Reads go a chunk of rows at a time, each in a daemon transaction under the
//! writer lock (rolled back: nothing is written), so a digest holds replication
//! and direct writes off only for one chunk's read, and rows written meanwhile
//! may or may not count: compare nodes that are not being written to.

use std::collections::BTreeMap;

use serde_json::Value;
use sha2::{Digest as _, Sha256};
use ulid::Ulid;

use super::Engine;
use crate::backend::Backend;
use crate::error::{Result, StoreError};
use crate::model::{TableInfo, Values};

/// Most rows one read transaction of a digest covers.
const CHUNK: u32 = 1000;
/// Most parts one digest splits its range into.
pub const MAX_PARTS: u32 = 256;
/// Most record hashes one call returns.
pub const MAX_RECORDS: u32 = 1000;

/// The digest of a table's rows in `[from, to)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RangeDigest {
    /// Inclusive; `None`: from the first id.
    pub from: Option<Ulid>,
    /// Exclusive; `None`: to the end.
    pub to: Option<Ulid>,
    pub rows: u64,
    /// Hex SHA-256 over the hashes of the rows, in id order.
    pub digest: String,
}

/// One row's hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHash {
    pub id: Ulid,
    /// Hex SHA-256 of the id and the row's canonical values.
    pub hash: String,
}

/// The hashes of a range's rows, in id order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordHashes {
    pub records: Vec<RecordHash>,
    /// The range held more rows than the limit.
    pub truncated: bool,
}

/// The `parts + 1` bounds that split `[from, to)` into `parts` ranges of equal
/// width (to within one id) over the 128-bit id space: the first bound is
/// `from`, the last `to`, `None` standing for the start and the end.
pub fn split_range(from: Option<Ulid>, to: Option<Ulid>, parts: u32) -> Vec<Option<Ulid>> {
    if parts <= 1 {
        return vec![from, to];
    }
    let low = from.map_or(0, u128::from);
    let n = u128::from(parts);
    // The width as quotient and remainder by n; the whole space is 2^128 ids,
    // one more than u128 holds.
    let (quotient, remainder) = match to {
        Some(to) => {
            let width = u128::from(to).saturating_sub(low);
            (width / n, width % n)
        }
        None => {
            let width_less_one = u128::MAX - low;
            let (q, r) = (width_less_one / n, width_less_one % n);
            if r + 1 == n { (q + 1, 0) } else { (q, r + 1) }
        }
    };
    let mut bounds = Vec::with_capacity(parts as usize + 1);
    bounds.push(from);
    // low + quotient*i + remainder*i/n < low + width <= 2^128: no overflow.
    bounds.extend((1..n).map(|i| Some(Ulid::from(low + quotient * i + remainder * i / n))));
    bounds.push(to);
    bounds
}

/// A row's hash: SHA-256 of its id, a newline, and its values as a JSON object
/// with sorted keys, each value in its class's hash form
/// ([`crate::value::ColumnType::hash_form`]: a float or JSON document that
/// two backends spell differently hashes alike).
pub fn row_hash(id: Ulid, table: &TableInfo, values: &Values) -> Result<[u8; 32]> {
    let sorted: BTreeMap<&str, Value> = values
        .iter()
        .map(|(k, v)| {
            let form = match table.column_type(k) {
                Some(ty) => ty.hash_form(v),
                None => v.clone(),
            };
            (k.as_str(), form)
        })
        .collect();
    let mut hasher = Sha256::new();
    hasher.update(id.to_string().as_bytes());
    hasher.update(b"\n");
    serde_json::to_writer(&mut hasher, &sorted)
        .map_err(|e| StoreError::corrupt(format!("the values of record {id}"), e.to_string()))?;
    Ok(hasher.finalize().into())
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(64), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Refuses `parts` out of 1..=256 and an empty or reversed range (fields named
/// as the Digest RPC names them).
fn check_request(from: Option<Ulid>, to: Option<Ulid>, parts: Option<u32>) -> Result<()> {
    if let Some(parts) = parts
        && !(1..=MAX_PARTS).contains(&parts)
    {
        return Err(StoreError::invalid(
            "parts",
            format!("{parts} is not between 1 and {MAX_PARTS}"),
        ));
    }
    if let (Some(from), Some(to)) = (from, to)
        && from >= to
    {
        return Err(StoreError::invalid(
            "to_id",
            format!("{to} must be after from_id {from} (the range is [from_id, to_id))"),
        ));
    }
    Ok(())
}

impl<B: Backend> Engine<B> {
    /// Digests of `table`'s rows in `[from, to)`, split into `parts` ranges (see
    /// [`split_range`]), in order.
    pub async fn digest(
        &self,
        table: &str,
        from: Option<Ulid>,
        to: Option<Ulid>,
        parts: u32,
    ) -> Result<Vec<RangeDigest>> {
        let info = self.table(table)?;
        check_request(from, to, Some(parts))?;
        let bounds = split_range(from, to, parts);
        let mut sums: Vec<(u64, Sha256)> = (0..parts).map(|_| (0, Sha256::new())).collect();
        let mut part = 0;
        let mut cursor = from;
        loop {
            let rows = self.read_rows(&info, cursor, to, CHUNK).await?;
            for (id, values) in &rows {
                while part + 1 < sums.len() && bounds[part + 1].is_some_and(|b| *id >= b) {
                    part += 1;
                }
                let (count, hasher) = &mut sums[part];
                *count += 1;
                hasher.update(row_hash(*id, &info, values)?);
            }
            match rows.last() {
                Some((last, _)) if rows.len() == CHUNK as usize => {
                    match u128::from(*last).checked_add(1) {
                        Some(next) => cursor = Some(Ulid::from(next)),
                        None => break,
                    }
                }
                _ => break,
            }
        }
        Ok(sums
            .into_iter()
            .enumerate()
            .map(|(i, (rows, hasher))| RangeDigest {
                from: bounds[i],
                to: bounds[i + 1],
                rows,
                digest: hex(&hasher.finalize()),
            })
            .collect())
    }

    /// The hash of each of `table`'s rows in `[from, to)`, in id order, at most
    /// `limit` (1 to [`MAX_RECORDS`]).
    pub async fn record_hashes(
        &self,
        table: &str,
        from: Option<Ulid>,
        to: Option<Ulid>,
        limit: u32,
    ) -> Result<RecordHashes> {
        let info = self.table(table)?;
        check_request(from, to, None)?;
        let limit = limit.clamp(1, MAX_RECORDS);
        let mut rows = self.read_rows(&info, from, to, limit + 1).await?;
        let truncated = rows.len() > limit as usize;
        rows.truncate(limit as usize);
        let records = rows
            .iter()
            .map(|(id, values)| {
                Ok(RecordHash {
                    id: *id,
                    hash: hex(&row_hash(*id, &info, values)?),
                })
            })
            .collect::<Result<_>>()?;
        Ok(RecordHashes { records, truncated })
    }

    /// At most `limit` rows of `[from, to)` with their canonical values, in id
    /// order, read in one transaction.
    async fn read_rows(
        &self,
        table: &TableInfo,
        from: Option<Ulid>,
        to: Option<Ulid>,
        limit: u32,
    ) -> Result<Vec<(Ulid, Values)>> {
        let (ids, mut rows) = {
            let _w = self.writer.lock().await;
            let mut tx = self.begin_tx().await?;
            let read = async {
                let ids = self
                    .backend
                    .row_ids(&mut tx, table, from, to, limit)
                    .await?;
                let rows = self.backend.rows(&mut tx, table, &ids).await?;
                Ok::<_, StoreError>((ids, rows))
            }
            .await;
            self.backend.rollback(tx).await?;
            read?
        };
        // The range and the order come from the database's comparison of the
        // key column; a collation that does not order ULID text by its bytes
        // would split ranges differently from other nodes.
        let in_order = ids.windows(2).all(|w| w[0] < w[1])
            && ids
                .iter()
                .all(|id| from.is_none_or(|f| *id >= f) && to.is_none_or(|t| *id < t));
        if !in_order {
            return Err(StoreError::corrupt(
                &table.table_name,
                "the database does not order the primary key as ULID text (by its bytes); \
                 check the key column's collation",
            ));
        }
        Ok(ids
            .into_iter()
            .filter_map(|id| rows.remove(&id).map(|values| (id, values)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_whole_space_splits_evenly() {
        let bounds = split_range(None, None, 16);
        assert_eq!(bounds.len(), 17);
        assert_eq!((bounds[0], bounds[16]), (None, None));
        assert_eq!(bounds[1], Some(Ulid::from(1u128 << 124)));
        assert_eq!(bounds[15], Some(Ulid::from(15u128 << 124)));
        let one = split_range(None, None, 1);
        assert_eq!(one, vec![None, None]);
    }

    #[test]
    fn a_range_splits_into_ordered_parts_that_cover_it() {
        for (from, to, parts) in [
            (Some(10u128), Some(17u128), 3u32),
            (Some(5), Some(7), 16),
            (Some(u128::MAX - 3), None, 4),
            (None, Some(1000), 7),
            (Some(1), None, 256),
            (None, None, 3),
            (Some(7), None, 1),
        ] {
            let bounds = split_range(from.map(Ulid::from), to.map(Ulid::from), parts);
            assert_eq!(bounds.len(), parts as usize + 1);
            assert_eq!(bounds[0], from.map(Ulid::from));
            assert_eq!(bounds[parts as usize], to.map(Ulid::from));
            let inner: Vec<u128> = bounds[1..parts as usize]
                .iter()
                .map(|b| u128::from(b.expect("inner bound")))
                .collect();
            assert!(inner.windows(2).all(|w| w[0] <= w[1]), "{inner:?}");
            let low = from.unwrap_or(0);
            assert!(
                inner
                    .iter()
                    .all(|b| *b >= low && to.is_none_or(|t| *b <= t))
            );
        }
    }

    fn table() -> TableInfo {
        use crate::value::ColumnType;
        TableInfo {
            datatype_id: Ulid::from(1u128),
            table_name: "t".into(),
            primary_key: "id".into(),
            columns: ["id", "a", "b", "f", "j"].map(String::from).to_vec(),
            types: vec![
                ColumnType::Text { max_chars: None },
                ColumnType::Text { max_chars: None },
                ColumnType::Int64,
                ColumnType::Float64,
                ColumnType::Json,
            ],
            declared: ["TEXT", "TEXT", "INTEGER", "REAL", "JSON"]
                .map(String::from)
                .to_vec(),
            conflict_policy: crate::model::ConflictPolicy::Lww,
            uniques: Vec::new(),
            foreign_keys: Vec::new(),
        }
    }

    #[test]
    fn a_row_hash_ignores_key_order_and_sees_every_value() {
        let id = Ulid::from(42u128);
        let t = table();
        let a: Values = serde_json::from_str(r#"{"id":"x","b":1,"a":"t"}"#).expect("json");
        let b: Values = serde_json::from_str(r#"{"a":"t","id":"x","b":1}"#).expect("json");
        let c: Values = serde_json::from_str(r#"{"a":"t","id":"x","b":2}"#).expect("json");
        let hash = |v: &Values| row_hash(id, &t, v).expect("hash");
        assert_eq!(hash(&a), hash(&b));
        assert_ne!(hash(&a), hash(&c));
        assert_ne!(
            hash(&a),
            row_hash(Ulid::from(43u128), &t, &a).expect("hash")
        );
    }

    /// What SQLite and PostgreSQL hold for the same row: -0.0 (SQLite keeps
    /// 0.0), a JSON document as written and as `jsonb` respells it.
    #[test]
    fn a_row_hash_is_the_same_for_both_backends_spellings() {
        let id = Ulid::from(42u128);
        let t = table();
        let row = |f: serde_json::Value, j: &str| -> Values {
            serde_json::from_value(serde_json::json!({"id": "x", "f": f, "j": j})).expect("row")
        };
        let hash = |v: &Values| row_hash(id, &t, v).expect("hash");
        let lite = row(
            serde_json::json!(0.0),
            r#"{"z":[1.0,-0.5e-3,"é"],"a":{"n":85892400622418800}}"#,
        );
        let pg = row(
            serde_json::json!("-0"),
            r#"{"a": {"n": 8.58924006224188e16}, "z": [1, -0.0005, "é"]}"#,
        );
        assert_eq!(hash(&lite), hash(&pg));
        // Values that differ still hash apart.
        let pg_doc = r#"{"a": {"n": 8.58924006224188e16}, "z": [1, -0.0005, "é"]}"#;
        let others = [
            row(serde_json::json!(0.5), pg_doc),
            row(serde_json::json!("-0"), &pg_doc.replace('é', "e")),
            row(serde_json::json!("-0"), &pg_doc.replace("[1,", "[1.5,")),
        ];
        for other in others {
            assert_ne!(hash(&lite), hash(&other));
        }
    }
}
