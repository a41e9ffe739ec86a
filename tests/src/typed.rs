//! Typed reads of any table on either backend, to compare rows value for value
//! across SQLite and PostgreSQL: each column is read as the class it replicates
//! as, from what the database holds natively (SQLite's storage class, the binary
//! form PostgreSQL sends), never through a text cast in SQL.

use std::collections::BTreeMap;
use std::fmt;

use sqlx::postgres::{PgRow, PgValueFormat};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, TypeInfo, ValueRef};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;

use crate::daemon::Reader;

/// How a column is compared: the column classes of ARCHITECTURE.md, "Values"
/// (the integer widths and text lengths read alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Int,
    Float,
    Decimal,
    Text,
    Bool,
    Date,
    Timestamptz,
    Uuid,
    Json,
    Bytes,
}

/// A value as a database holds it.
#[derive(Clone, PartialEq)]
pub enum Val {
    Null,
    Int(i64),
    /// A double's bits: equal only when bit-identical.
    Float(u64),
    /// A decimal's value as `digits e exponent`, without insignificant zeros.
    Decimal(String),
    Text(String),
    Bool(bool),
    /// Days since 1970-01-01.
    Date(i64),
    /// Microseconds since the Unix epoch.
    Timestamp(i64),
    Uuid(u128),
    Json(serde_json::Value),
    Bytes(Vec<u8>),
}

impl fmt::Debug for Val {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Val::Null => f.write_str("NULL"),
            Val::Int(i) => write!(f, "{i}"),
            Val::Float(bits) => write!(f, "{:?} (bits {bits:#018x})", f64::from_bits(*bits)),
            Val::Decimal(d) => write!(f, "decimal {d}"),
            Val::Text(s) if s.len() > 80 => {
                let head: String = s.chars().take(40).collect();
                write!(f, "text {head:?}… ({} bytes)", s.len())
            }
            Val::Text(s) => write!(f, "text {s:?}"),
            Val::Bool(b) => write!(f, "{b}"),
            Val::Date(d) => write!(f, "day {d}"),
            Val::Timestamp(us) => write!(f, "{us} µs"),
            Val::Uuid(u) => write!(f, "uuid {u:032x}"),
            Val::Json(doc) => write!(f, "json {doc}"),
            Val::Bytes(b) if b.len() > 16 => write!(f, "{} bytes {:02x?}…", b.len(), &b[..16]),
            Val::Bytes(b) => write!(f, "bytes {b:02x?}"),
        }
    }
}

/// `value` as [`Val::Decimal`]: `-0012.3400` is `-1234e-2`, every zero `0`.
pub fn decimal(value: &str) -> Val {
    let (negative, unsigned) = match value.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, value.strip_prefix('+').unwrap_or(value)),
    };
    let (int, frac) = unsigned.split_once('.').unwrap_or((unsigned, ""));
    assert!(
        !unsigned.is_empty() && (int.len() + frac.len()) > 0,
        "not a decimal: {value:?}"
    );
    assert!(
        int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()),
        "not a plain decimal: {value:?}"
    );
    Val::Decimal(normalise(
        negative,
        &format!("{int}{frac}"),
        -(frac.len() as i64),
    ))
}

/// Significant digits times ten to `exponent`, as `digits e exponent`.
fn normalise(negative: bool, digits: &str, exponent: i64) -> String {
    let trimmed = digits.trim_end_matches('0');
    let exponent = exponent + (digits.len() - trimmed.len()) as i64;
    let significant = trimmed.trim_start_matches('0');
    if significant.is_empty() {
        return "0".into();
    }
    let sign = if negative { "-" } else { "" };
    format!("{sign}{significant}e{exponent}")
}

/// Every row of `table` (its primary key is `id`) with `columns`, by id.
pub async fn rows(
    reader: &Reader,
    table: &str,
    columns: &[(&str, Class)],
) -> BTreeMap<String, Vec<Val>> {
    let names: Vec<&str> = columns.iter().map(|c| c.0).collect();
    let sql = format!("SELECT id, {} FROM {table}", names.join(", "));
    let id = |s: String| s.trim().to_owned();
    match reader {
        Reader::Sqlite(pool) => sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(pool)
            .await
            .unwrap_or_else(|e| panic!("read {table} on SQLite: {e}"))
            .iter()
            .map(|row| {
                let values = columns
                    .iter()
                    .enumerate()
                    .map(|(i, (name, class))| sqlite_val(row, i + 1, *class, name))
                    .collect();
                (id(row.get(0)), values)
            })
            .collect(),
        Reader::Postgres(pool) => sqlx::query(sqlx::AssertSqlSafe(sql))
            .fetch_all(pool)
            .await
            .unwrap_or_else(|e| panic!("read {table} on PostgreSQL: {e}"))
            .iter()
            .map(|row| {
                let values = columns
                    .iter()
                    .enumerate()
                    .map(|(i, (name, class))| pg_val(row, i + 1, *class, name))
                    .collect();
                (id(row.get(0)), values)
            })
            .collect(),
    }
}

/// `date` as [`Val::Date`].
pub fn date(date: time::Date) -> Val {
    Val::Date(i64::from(date.to_julian_day()) - 2_440_588)
}

/// `instant` as [`Val::Timestamp`].
pub fn instant(instant: OffsetDateTime) -> Val {
    Val::Timestamp((instant.unix_timestamp_nanos() / 1000) as i64)
}

/// Column `i` of a SQLite row, by the storage class SQLite holds it in.
fn sqlite_val(row: &SqliteRow, i: usize, class: Class, name: &str) -> Val {
    let raw = row.try_get_raw(i).expect("raw value");
    if raw.is_null() {
        return Val::Null;
    }
    let storage = raw.type_info().name().to_owned();
    let text = || -> String { row.try_get_unchecked(i).expect("text") };
    match (class, storage.as_str()) {
        (Class::Int, "INTEGER") => Val::Int(row.try_get_unchecked(i).expect("integer")),
        (Class::Float, "REAL") => {
            Val::Float(row.try_get_unchecked::<f64, _>(i).expect("real").to_bits())
        }
        (Class::Bool, "INTEGER") => match row.try_get_unchecked::<i64, _>(i).expect("integer") {
            0 => Val::Bool(false),
            1 => Val::Bool(true),
            other => panic!("SQLite column {name} holds {other} as a boolean"),
        },
        (Class::Bytes, "BLOB") => Val::Bytes(row.try_get_unchecked(i).expect("blob")),
        (Class::Decimal, "TEXT") => decimal(&text()),
        (Class::Text, "TEXT") => Val::Text(text()),
        (Class::Date, "TEXT") => {
            let d = time::Date::parse(&text(), format_description!("[year]-[month]-[day]"))
                .unwrap_or_else(|e| panic!("SQLite column {name}: {e}"));
            date(d)
        }
        (Class::Timestamptz, "TEXT") => {
            let t = OffsetDateTime::parse(&text(), &Rfc3339)
                .unwrap_or_else(|e| panic!("SQLite column {name}: {e}"));
            instant(t)
        }
        (Class::Uuid, "TEXT") => {
            let s = text();
            assert!(
                s.len() == 36 && s == s.to_lowercase(),
                "SQLite column {name}: {s:?} is not a canonical UUID"
            );
            Val::Uuid(u128::from_str_radix(&s.replace('-', ""), 16).expect("uuid"))
        }
        (Class::Json, "TEXT") => Val::Json(serde_json::from_str(&text()).expect("json")),
        (class, storage) => panic!("SQLite column {name} holds {storage} for a {class:?}"),
    }
}

/// Seconds between 1970-01-01 and PostgreSQL's epoch, 2000-01-01.
const PG_EPOCH_SECONDS: i64 = 946_684_800;

/// Column `i` of a PostgreSQL row, from the binary form of its type.
fn pg_val(row: &PgRow, i: usize, class: Class, name: &str) -> Val {
    let raw = row.try_get_raw(i).expect("raw value");
    if raw.is_null() {
        return Val::Null;
    }
    assert!(
        raw.format() == PgValueFormat::Binary,
        "PostgreSQL column {name} came as text"
    );
    let pg_type = raw.type_info().name().to_owned();
    let b = raw.as_bytes().expect("bytes");
    let int = |n: usize| -> i64 {
        let mut v: i64 = if b[0] & 0x80 != 0 { -1 } else { 0 };
        for byte in &b[..n] {
            v = (v << 8) | i64::from(*byte);
        }
        v
    };
    let utf8 = |bytes: &[u8]| String::from_utf8(bytes.to_vec()).expect("UTF-8");
    match (class, pg_type.as_str()) {
        (Class::Int, "INT2") => Val::Int(int(2)),
        (Class::Int, "INT4") => Val::Int(int(4)),
        (Class::Int, "INT8") => Val::Int(int(8)),
        (Class::Float, "FLOAT8") => Val::Float(u64::from_be_bytes(b.try_into().expect("8 bytes"))),
        (Class::Decimal, "NUMERIC") => pg_numeric(b, name),
        (Class::Text, "TEXT" | "VARCHAR") => Val::Text(utf8(b)),
        // character(n) pads with blanks; its class carries the text without them.
        (Class::Text, "CHAR") => Val::Text(utf8(b).trim_end_matches(' ').to_owned()),
        (Class::Bool, "BOOL") => Val::Bool(b == [1]),
        (Class::Date, "DATE") => Val::Date(int(4) + PG_EPOCH_SECONDS / 86_400),
        (Class::Timestamptz, "TIMESTAMPTZ") => {
            Val::Timestamp(int(8) + PG_EPOCH_SECONDS * 1_000_000)
        }
        (Class::Uuid, "UUID") => Val::Uuid(u128::from_be_bytes(b.try_into().expect("16 bytes"))),
        (Class::Json, "JSONB") => {
            assert_eq!(b.first(), Some(&1), "jsonb version");
            Val::Json(serde_json::from_slice(&b[1..]).expect("json"))
        }
        (Class::Json, "JSON") => Val::Json(serde_json::from_slice(b).expect("json")),
        (Class::Bytes, "BYTEA") => Val::Bytes(b.to_vec()),
        (class, pg_type) => panic!("PostgreSQL column {name} is {pg_type} for a {class:?}"),
    }
}

/// PostgreSQL's binary NUMERIC: digit count, weight (of the first base-10000
/// digit), sign, display scale, then the base-10000 digits.
fn pg_numeric(b: &[u8], name: &str) -> Val {
    let word = |at: usize| u16::from_be_bytes([b[at], b[at + 1]]);
    let (count, weight, sign) = (word(0) as usize, word(2) as i16, word(4));
    let negative = match sign {
        0x0000 => false,
        0x4000 => true,
        other => panic!("PostgreSQL column {name}: a numeric special value ({other:#06x})"),
    };
    let digits: String = (0..count)
        .map(|k| format!("{:04}", word(8 + 2 * k)))
        .collect();
    let exponent = 4 * (i64::from(weight) + 1 - count as i64);
    Val::Decimal(normalise(negative, &digits, exponent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_compare_by_value() {
        assert_eq!(decimal("-0012.3400"), Val::Decimal("-1234e-2".into()));
        assert_eq!(decimal("1200"), decimal("1200.000"));
        assert_eq!(decimal("-0.000"), decimal("0"));
        assert_ne!(decimal("0.1"), decimal("0.01"));
        // 12345.678 in base 10000: weight 1, digits 1 2345 6780.
        let bin = [0, 3, 0, 1, 0, 0, 0, 3, 0, 1, 0x09, 0x29, 0x1a, 0x7c];
        assert_eq!(pg_numeric(&bin, "n"), decimal("12345.678"));
    }
}
