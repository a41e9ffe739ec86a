//! Column types and the one exact representation of values.
//!
//! Every replicated column has a [`ColumnType`]: a portable class derived from
//! the column's declared type on its backend (SQLite's declared type name, or
//! PostgreSQL's `format_type`), optionally overridden for SQLite columns in the
//! configuration. The class is part of the schema nodes agree on at handshake, and
//! it fixes how a value travels:
//!
//! | class            | log and wire (JSON)                          | SQLite storage | PostgreSQL |
//! |------------------|-----------------------------------------------|----------------|------------|
//! | `int16/32/64`    | integer                                       | INTEGER        | smallint / integer / bigint |
//! | `float32/64`     | number (shortest round-trip form); the strings `"Infinity"`, `"-Infinity"`, `"-0"` | REAL | real / double precision |
//! | `decimal(p,s)`   | string, plain decimal (`"-12.50"`), padded to the scale | TEXT  | numeric(p,s) |
//! | `text`, `text(n)`| string (no NUL)                               | TEXT           | text / varchar(n) |
//! | `char(n)`        | string without trailing spaces                | TEXT           | character(n) |
//! | `bool`           | `true` / `false`                              | INTEGER 0 / 1  | boolean |
//! | `date`           | `"YYYY-MM-DD"`                                | TEXT           | date |
//! | `time`           | `"HH:MM:SS[.ffffff]"`                         | TEXT           | time |
//! | `timestamp`      | `"YYYY-MM-DDTHH:MM:SS[.ffffff]"`              | TEXT           | timestamp |
//! | `timestamptz`    | `"YYYY-MM-DDTHH:MM:SS[.ffffff]Z"` (UTC)       | TEXT           | timestamptz |
//! | `uuid`           | lowercase hyphenated string                   | TEXT           | uuid |
//! | `json`           | string holding the document's text            | TEXT           | json / jsonb |
//! | `bytes`          | string, standard base64 with padding          | BLOB           | bytea |
//!
//! SQL NULL is JSON `null` for every class; a JSON column holding the JSON
//! document `null` is the string `"null"`, so the two stay distinct.
//!
//! The value domain of a class is what every backend holding it stores exactly;
//! a value outside it is refused where it is written (the write API, the capture
//! of a direct write) with a reason naming the class, never carried to a node
//! that would store something else. So NaN is refused (SQLite stores it as
//! NULL), text with NUL is refused (PostgreSQL cannot store it), a decimal with
//! more places than its column's scale is refused (PostgreSQL would round it),
//! and dates are limited to the years 1 to 9999 (SQLite's date functions). One
//! loss is SQLite's own and accepted: SQLite stores the double -0.0 as 0.0, which
//! compares equal.

use std::fmt;
use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::value::RawValue;
use serde_json::{Number, Value};

/// The portable class of a replicated column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ColumnType {
    Int16,
    Int32,
    Int64,
    Float32,
    Float64,
    /// Exact decimal; `precision` None means unconstrained (then `scale` is 0 and
    /// values keep the places they were written with).
    Decimal {
        precision: Option<u32>,
        scale: u32,
    },
    /// Text of at most `max_chars` characters (unbounded when None).
    Text {
        max_chars: Option<u32>,
    },
    /// Blank-padded text of `len` characters (PostgreSQL `character(n)`); trailing
    /// spaces are not significant and are not carried.
    Char {
        len: u32,
    },
    Bool,
    Date,
    Time,
    Timestamp,
    TimestampTz,
    Uuid,
    Json,
    Bytes,
}

/// Whether two JSON documents hold the same data, numbers compared by value:
/// PostgreSQL's `jsonb` writes the number 8.58924006224188e16 as
/// `85892400622418800`, SQLite keeps the text written, and both are one number.
fn same_document(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => same_number(x, y),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(v, w)| same_document(v, w))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_document(v, w)))
        }
        _ => a == b,
    }
}

/// Two JSON numbers are equal as numbers: their [`number_form`]s match.
fn same_number(x: &Number, y: &Number) -> bool {
    number_form(x) == number_form(y)
}

/// One spelling per JSON number, the same for what SQLite keeps and what
/// PostgreSQL's `jsonb` writes back: an integer serde_json reads as one (up to
/// 64 bits) in its digits; any other number as the double it reads as, in the
/// shortest digits that round-trip, written out without an exponent (-0 as 0).
/// `jsonb` keeps a number's exact decimal and writes `1.6324675820123441e+19`
/// as `16324675820123441000`: the shortest digits of that double, the
/// integer's digits. (A number written with more digits than its double
/// holds, which `jsonb` keeps and serde_json rounds, reads differently.)
fn number_form(n: &Number) -> String {
    if let Some(i) = n.as_i64() {
        return i.to_string();
    }
    if let Some(u) = n.as_u64() {
        return u.to_string();
    }
    match n.as_f64() {
        // `Display` for f64: the shortest round-trip digits, no exponent.
        Some(f) => (if f == 0.0 { 0.0 } else { f }).to_string(),
        None => n.to_string(),
    }
}

/// The double a float column's value (a number, or one of the special
/// strings) stands for.
fn float_of(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => number_to_f64(n).ok(),
        Value::String(s) => special_float(s).ok(),
        _ => None,
    }
}

/// A JSON document written one way for [`ColumnType::hash_form`]: object keys
/// sorted, no whitespace, strings as serde_json writes them, numbers in their
/// [`number_form`].
fn document_hash_text(doc: &Value, out: &mut String) {
    match doc {
        Value::Number(n) => out.push_str(&number_form(n)),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                document_hash_text(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                document_hash_text(v, out);
            }
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// A value as SQLite stores it (its storage class).
#[derive(Debug, Clone, PartialEq)]
pub enum SqlCell {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

/// PostgreSQL numeric limits: digits before and after the decimal point.
const PG_NUMERIC_INT_DIGITS: usize = 131_072;
const PG_NUMERIC_FRAC_DIGITS: usize = 16_383;

const SUPPORTED_PG: &str = "smallint, integer, bigint, real, double precision, numeric, text, \
     varchar, char, boolean, date, time, timestamp, timestamptz, uuid, json, jsonb, bytea";

impl fmt::Display for ColumnType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ColumnType::Int16 => f.write_str("int16"),
            ColumnType::Int32 => f.write_str("int32"),
            ColumnType::Int64 => f.write_str("int64"),
            ColumnType::Float32 => f.write_str("float32"),
            ColumnType::Float64 => f.write_str("float64"),
            ColumnType::Decimal {
                precision: None, ..
            } => f.write_str("decimal"),
            ColumnType::Decimal {
                precision: Some(p),
                scale,
            } => write!(f, "decimal({p},{scale})"),
            ColumnType::Text { max_chars: None } => f.write_str("text"),
            ColumnType::Text { max_chars: Some(n) } => write!(f, "text({n})"),
            ColumnType::Char { len } => write!(f, "char({len})"),
            ColumnType::Bool => f.write_str("bool"),
            ColumnType::Date => f.write_str("date"),
            ColumnType::Time => f.write_str("time"),
            ColumnType::Timestamp => f.write_str("timestamp"),
            ColumnType::TimestampTz => f.write_str("timestamptz"),
            ColumnType::Uuid => f.write_str("uuid"),
            ColumnType::Json => f.write_str("json"),
            ColumnType::Bytes => f.write_str("bytes"),
        }
    }
}

/// Splits `NAME(args)` into the upper-cased, space-normalised name and the
/// arguments (parsed as numbers).
fn split_type(declared: &str) -> Result<(String, Vec<u32>), String> {
    let d = declared.trim();
    let (name, args) = match d.find('(') {
        Some(open) => {
            let close = d
                .rfind(')')
                .ok_or_else(|| format!("{declared:?} has an unclosed parenthesis"))?;
            if close < open {
                return Err(format!("{declared:?} is malformed"));
            }
            let rest = d[close + 1..].trim();
            let name = format!("{} {rest}", d[..open].trim());
            let args = d[open + 1..close]
                .split(',')
                .map(|a| {
                    a.trim()
                        .parse::<u32>()
                        .map_err(|_| format!("{declared:?} has a non-numeric argument {a:?}"))
                })
                .collect::<Result<Vec<_>, _>>()?;
            (name, args)
        }
        None => (d.to_owned(), Vec::new()),
    };
    let name = name
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_ascii_uppercase();
    Ok((name, args))
}

/// SQLite's type affinity of a declared type (its section 3.1 rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Affinity {
    Integer,
    Text,
    Blob,
    Real,
    Numeric,
}

impl Affinity {
    pub fn of(declared: &str) -> Affinity {
        let d = declared.to_ascii_uppercase();
        if d.contains("INT") {
            Affinity::Integer
        } else if d.contains("CHAR") || d.contains("CLOB") || d.contains("TEXT") {
            Affinity::Text
        } else if d.contains("BLOB") || d.trim().is_empty() {
            Affinity::Blob
        } else if d.contains("REAL") || d.contains("FLOA") || d.contains("DOUB") {
            Affinity::Real
        } else {
            Affinity::Numeric
        }
    }
}

impl ColumnType {
    /// The class of a SQLite column from its declared type.
    pub fn of_sqlite(declared: &str) -> Result<ColumnType, String> {
        let (name, args) = split_type(declared)?;
        let sized = |what: &str| -> Result<Option<u32>, String> {
            match args.as_slice() {
                [] => Ok(None),
                [n] if *n > 0 => Ok(Some(*n)),
                _ => Err(format!("{declared:?}: {what} takes one positive length")),
            }
        };
        Ok(match name.as_str() {
            "" => {
                return Err(
                    "it has no declared type, so SQLite stores any value in it; declare one \
                     (INTEGER, REAL, TEXT, BLOB, BOOLEAN, DATE, TIMESTAMP, UUID, JSON ...)"
                        .into(),
                );
            }
            "SMALLINT" | "INT2" | "TINYINT" => ColumnType::Int16,
            "INT4" | "MEDIUMINT" => ColumnType::Int32,
            "BOOLEAN" | "BOOL" => ColumnType::Bool,
            "DATE" => ColumnType::Date,
            "TIME" => ColumnType::Time,
            "DATETIME" | "TIMESTAMP" | "TIMESTAMPTZ" | "TIMESTAMP WITH TIME ZONE" => {
                ColumnType::TimestampTz
            }
            "TIMESTAMP WITHOUT TIME ZONE" => ColumnType::Timestamp,
            "UUID" => ColumnType::Uuid,
            "JSON" | "JSONB" => ColumnType::Json,
            "DECIMAL" | "NUMERIC" => {
                return Err(format!(
                    "SQLite stores {name} values as 64-bit integers or doubles (about 15 \
                     significant digits), not exact decimals: declare the column REAL to \
                     replicate doubles, or TEXT with the type override \"decimal(p,s)\" \
                     (tables.types in the configuration) to replicate exact decimals"
                ));
            }
            "CHAR" | "CHARACTER" | "NCHAR" | "NATIVE CHARACTER" => match sized("CHAR")? {
                Some(len) => ColumnType::Char { len },
                None => ColumnType::Text { max_chars: None },
            },
            "VARCHAR" | "CHARACTER VARYING" | "VARYING CHARACTER" | "NVARCHAR" => {
                ColumnType::Text {
                    max_chars: sized("VARCHAR")?,
                }
            }
            _ => match Affinity::of(&name) {
                Affinity::Integer => ColumnType::Int64,
                Affinity::Text => ColumnType::Text { max_chars: None },
                Affinity::Blob => ColumnType::Bytes,
                Affinity::Real => ColumnType::Float64,
                Affinity::Numeric => {
                    return Err(format!(
                        "declared type {declared:?} is not one Tidemark knows how to replicate \
                         on SQLite (INTEGER, SMALLINT, REAL, TEXT, VARCHAR(n), CHAR(n), BLOB, \
                         BOOLEAN, DATE, TIME, TIMESTAMP, DATETIME, UUID, JSON); set a type \
                         override (tables.types) if it holds one of those"
                    ));
                }
            },
        })
    }

    /// Whether a SQLite column of this declared type stores every value of this
    /// class exactly (for a type override).
    pub fn fits_sqlite(&self, declared: &str) -> Result<(), String> {
        let affinity = Affinity::of(declared);
        let ok = match self {
            ColumnType::Int16 | ColumnType::Int32 | ColumnType::Int64 | ColumnType::Bool => {
                matches!(
                    affinity,
                    Affinity::Integer | Affinity::Numeric | Affinity::Blob
                )
            }
            ColumnType::Float64 => matches!(
                affinity,
                Affinity::Real | Affinity::Numeric | Affinity::Blob
            ),
            ColumnType::Float32 => false,
            ColumnType::Bytes => true,
            ColumnType::Decimal { .. } => matches!(affinity, Affinity::Text | Affinity::Blob),
            ColumnType::Text { .. }
            | ColumnType::Char { .. }
            | ColumnType::Date
            | ColumnType::Time
            | ColumnType::Timestamp
            | ColumnType::TimestampTz
            | ColumnType::Uuid
            | ColumnType::Json => matches!(
                affinity,
                Affinity::Text | Affinity::Blob | Affinity::Numeric
            ),
        };
        if ok {
            Ok(())
        } else {
            Err(format!(
                "a SQLite column declared {declared:?} ({affinity:?} affinity) cannot hold {self} \
                 values exactly{}",
                if matches!(self, ColumnType::Decimal { .. }) {
                    ": declare it TEXT"
                } else {
                    ""
                }
            ))
        }
    }

    /// The class of a PostgreSQL column from `format_type(atttypid, atttypmod)`.
    pub fn of_postgres(format_type: &str) -> Result<ColumnType, String> {
        let (name, args) = split_type(format_type)?;
        let unsupported = || {
            format!("PostgreSQL type {format_type} is not replicated (supported: {SUPPORTED_PG})")
        };
        let no_precision = |what: &str| {
            format!(
                "{format_type}: a {what} with a fractional-seconds precision rounds what other \
                 nodes send; declare it without one"
            )
        };
        Ok(match (name.as_str(), args.as_slice()) {
            ("SMALLINT", []) => ColumnType::Int16,
            ("INTEGER", []) => ColumnType::Int32,
            ("BIGINT", []) => ColumnType::Int64,
            ("REAL", []) => ColumnType::Float32,
            ("DOUBLE PRECISION", []) => ColumnType::Float64,
            ("NUMERIC", []) => ColumnType::Decimal {
                precision: None,
                scale: 0,
            },
            ("NUMERIC", [p]) => ColumnType::Decimal {
                precision: Some(*p),
                scale: 0,
            },
            ("NUMERIC", [p, s]) if s <= p => ColumnType::Decimal {
                precision: Some(*p),
                scale: *s,
            },
            ("TEXT", []) | ("CHARACTER VARYING", []) => ColumnType::Text { max_chars: None },
            ("CHARACTER VARYING", [n]) => ColumnType::Text {
                max_chars: Some(*n),
            },
            ("CHARACTER", [n]) => ColumnType::Char { len: *n },
            ("BPCHAR", []) => ColumnType::Text { max_chars: None },
            ("BOOLEAN", []) => ColumnType::Bool,
            ("DATE", []) => ColumnType::Date,
            ("TIME WITHOUT TIME ZONE", []) => ColumnType::Time,
            ("TIMESTAMP WITHOUT TIME ZONE", []) => ColumnType::Timestamp,
            ("TIMESTAMP WITH TIME ZONE", []) => ColumnType::TimestampTz,
            ("TIME WITHOUT TIME ZONE", [_]) => return Err(no_precision("time")),
            ("TIMESTAMP WITHOUT TIME ZONE" | "TIMESTAMP WITH TIME ZONE", [_]) => {
                return Err(no_precision("timestamp"));
            }
            ("UUID", []) => ColumnType::Uuid,
            ("JSON", []) | ("JSONB", []) => ColumnType::Json,
            ("BYTEA", []) => ColumnType::Bytes,
            _ => return Err(unsupported()),
        })
    }

    /// Whether values of this class are stored as text on SQLite.
    pub fn is_text_stored(&self) -> bool {
        !(self.is_number_or_bool() || *self == ColumnType::Bytes)
    }

    /// The integer, float and boolean classes.
    fn is_number_or_bool(&self) -> bool {
        matches!(
            self,
            ColumnType::Int16
                | ColumnType::Int32
                | ColumnType::Int64
                | ColumnType::Float32
                | ColumnType::Float64
                | ColumnType::Bool
        )
    }

    /// Checks a value as the log and the wire carry it and returns its canonical
    /// form (the error says why it is not a value of this class).
    pub fn check(&self, v: &Value) -> Result<Value, String> {
        if v.is_null() {
            return Ok(Value::Null);
        }
        match self {
            ColumnType::Int16 | ColumnType::Int32 | ColumnType::Int64 => match v {
                Value::Number(n) => match n.as_i64() {
                    Some(i) => self.int(i),
                    None => Err(format!("{n} is not a 64-bit integer")),
                },
                other => Err(format!("expected an integer, found {}", kind(other))),
            },
            ColumnType::Float32 | ColumnType::Float64 => {
                let f = match v {
                    Value::Number(n) => number_to_f64(n)?,
                    Value::String(s) => special_float(s)?,
                    other => return Err(format!("expected a number, found {}", kind(other))),
                };
                self.float(f)
            }
            ColumnType::Decimal { precision, scale } => match v {
                Value::String(s) => Ok(Value::String(decimal(s, *precision, *scale)?)),
                other => Err(format!(
                    "expected a decimal as a string, found {}",
                    kind(other)
                )),
            },
            ColumnType::Bool => match v {
                Value::Bool(b) => Ok(Value::Bool(*b)),
                other => Err(format!("expected true or false, found {}", kind(other))),
            },
            _ => match v {
                Value::String(s) => self.text_class(s),
                other => Err(format!("expected a string, found {}", kind(other))),
            },
        }
    }

    /// Whether two values of this class, each in its canonical form (or as a
    /// log holds it), are the same value to the application, whichever backend
    /// wrote them: floats compare as numbers (SQLite cannot keep -0.0 apart
    /// from 0.0), JSON documents as parsed JSON (PostgreSQL's `jsonb` respells
    /// and reorders a document; numbers inside one compare by their
    /// [`number_form`], so two integers past 2^64 that serde_json reads as the
    /// same double compare equal), everything else by its canonical form.
    pub fn same(&self, a: &Value, b: &Value) -> bool {
        if a == b {
            return true;
        }
        match self {
            ColumnType::Float32 | ColumnType::Float64 => {
                matches!((float_of(a), float_of(b)), (Some(x), Some(y)) if x == y)
            }
            ColumnType::Json => {
                let doc = |v: &Value| match v {
                    Value::String(s) => serde_json::from_str::<Value>(s).ok(),
                    _ => None,
                };
                matches!((doc(a), doc(b)), (Some(x), Some(y)) if same_document(&x, &y))
            }
            _ => matches!(
                (self.check(a), self.check(b)),
                (Ok(x), Ok(y)) if x == y
            ),
        }
    }

    /// A value's form in row hashes (`tidemark admin check`): two values of
    /// this class hash alike exactly when [`ColumnType::same`] says they are the
    /// same, whichever backend wrote them. Floats by their double (-0.0 as
    /// 0.0), JSON documents respelled one way (keys sorted, no spaces, strings
    /// escaped as serde_json escapes them, numbers in their [`number_form`]),
    /// everything else in its canonical form.
    pub fn hash_form(&self, v: &Value) -> Value {
        match self {
            ColumnType::Float32 | ColumnType::Float64 => match float_of(v) {
                Some(f) if f.is_finite() => Value::from(if f == 0.0 { 0.0 } else { f }),
                _ => v.clone(),
            },
            ColumnType::Json => match v {
                Value::String(s) => match serde_json::from_str::<Value>(s) {
                    Ok(doc) => {
                        let mut out = String::with_capacity(s.len());
                        document_hash_text(&doc, &mut out);
                        Value::String(out)
                    }
                    Err(_) => v.clone(),
                },
                _ => v.clone(),
            },
            _ => self.check(v).unwrap_or_else(|_| v.clone()),
        }
    }

    /// Reads a value an application wrote as JSON (the write API): numbers keep
    /// their exact text, a JSON column takes the document itself, bytes are
    /// base64, booleans may be 0 or 1.
    pub fn from_api(&self, raw: &RawValue) -> Result<Value, String> {
        let text = raw.get().trim();
        if text == "null" {
            return Ok(Value::Null);
        }
        match self {
            ColumnType::Json => {
                if text.contains("\\u0000") {
                    return Err(nul_in_json());
                }
                json_number_fits(text)?;
                Ok(Value::String(text.to_owned()))
            }
            ColumnType::Int16 | ColumnType::Int32 | ColumnType::Int64 => {
                match text.parse::<i64>() {
                    Ok(i) => self.int(i),
                    Err(_) => Err(format!("{} is not a 64-bit integer", shorten(text))),
                }
            }
            ColumnType::Float32 | ColumnType::Float64 if is_number(text) => {
                let f = f64::from_str(text)
                    .map_err(|_| format!("{} is not a number", shorten(text)))?;
                self.float(f)
            }
            ColumnType::Decimal { precision, scale } if is_number(text) => {
                Ok(Value::String(decimal(text, *precision, *scale)?))
            }
            ColumnType::Bool if text == "0" || text == "1" => Ok(Value::Bool(text == "1")),
            _ => {
                let v: Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
                self.check(&v)
            }
        }
    }

    /// Reads one value of PostgreSQL's `to_json` (the daemon's sessions and the
    /// capture functions run with `extra_float_digits = 3` and `TimeZone = UTC`;
    /// JSON columns are selected as text, bytea comes as `\x` hex).
    pub fn from_pg_json(&self, raw: &RawValue) -> Result<Value, String> {
        let text = raw.get();
        match self {
            ColumnType::Bytes if text != "null" => {
                let s: String = serde_json::from_str(text).map_err(|e| e.to_string())?;
                let hex = s
                    .strip_prefix("\\x")
                    .ok_or_else(|| "bytea did not come in hex form".to_owned())?;
                Ok(Value::String(BASE64.encode(unhex(hex)?)))
            }
            ColumnType::Json if text != "null" => {
                let s: String = serde_json::from_str(text).map_err(|e| e.to_string())?;
                self.check(&Value::String(s))
            }
            _ => self.from_api(raw),
        }
    }

    /// The text PostgreSQL's input function of the column's type reads this
    /// (canonical) value from; None for NULL.
    pub fn to_pg_text(&self, v: &Value) -> Option<String> {
        match v {
            Value::Null => None,
            Value::Bool(b) => Some(b.to_string()),
            Value::Number(n) => Some(match (self, n.as_f64()) {
                (ColumnType::Float32 | ColumnType::Float64, Some(f)) => format!("{f:?}"),
                _ => n.to_string(),
            }),
            Value::String(s) => Some(match self {
                ColumnType::Bytes => {
                    let bytes = BASE64.decode(s).unwrap_or_default();
                    let mut out = String::with_capacity(2 + 2 * bytes.len());
                    out.push_str("\\x");
                    for b in bytes {
                        out.push_str(&format!("{b:02x}"));
                    }
                    out
                }
                _ => s.clone(),
            }),
            other => Some(other.to_string()),
        }
    }

    /// The SQLite value that stores this (canonical) value.
    pub fn to_sqlite(&self, v: &Value) -> SqlCell {
        match v {
            Value::Null => SqlCell::Null,
            Value::Bool(b) => SqlCell::Int(i64::from(*b)),
            Value::Number(n) => match self {
                ColumnType::Float32 | ColumnType::Float64 => {
                    SqlCell::Real(n.as_f64().unwrap_or_default())
                }
                _ => match n.as_i64() {
                    Some(i) => SqlCell::Int(i),
                    None => SqlCell::Real(n.as_f64().unwrap_or_default()),
                },
            },
            Value::String(s) => match self {
                ColumnType::Float32 | ColumnType::Float64 => {
                    SqlCell::Real(special_float(s).unwrap_or(0.0))
                }
                ColumnType::Bytes => SqlCell::Blob(BASE64.decode(s).unwrap_or_default()),
                _ => SqlCell::Text(s.clone()),
            },
            other => SqlCell::Text(other.to_string()),
        }
    }

    /// Reads a value SQLite stored (its storage class as the driver reports it).
    pub fn from_sqlite(&self, cell: SqlCell) -> Result<Value, String> {
        let found = |what: &str| format!("SQLite holds {what} in a {self} column");
        match cell {
            SqlCell::Null => Ok(Value::Null),
            SqlCell::Int(i) => match self {
                ColumnType::Int16 | ColumnType::Int32 | ColumnType::Int64 => self.int(i),
                ColumnType::Float32 | ColumnType::Float64 => {
                    let f = i as f64;
                    if f as i128 != i128::from(i) {
                        return Err(format!(
                            "the integer {i} has no exact double; a {self} column cannot replicate it"
                        ));
                    }
                    self.float(f)
                }
                ColumnType::Bool => match i {
                    0 | 1 => Ok(Value::Bool(i == 1)),
                    _ => Err(format!("{i} is not a boolean (0 or 1)")),
                },
                ColumnType::Decimal { precision, scale } => {
                    Ok(Value::String(decimal(&i.to_string(), *precision, *scale)?))
                }
                ColumnType::Json => Ok(Value::String(i.to_string())),
                ColumnType::Bytes => Err(found("an integer")),
                _ => self.text_class(&i.to_string()),
            },
            SqlCell::Real(f) => match self {
                ColumnType::Float32 | ColumnType::Float64 => self.float(f),
                ColumnType::Decimal { precision, scale } if f.is_finite() => {
                    Ok(Value::String(decimal(&format!("{f}"), *precision, *scale)?))
                }
                ColumnType::Json if f.is_finite() => Ok(Value::String(format!("{f:?}"))),
                _ => Err(found("a real number")),
            },
            SqlCell::Text(s) => match self {
                ColumnType::Int16
                | ColumnType::Int32
                | ColumnType::Int64
                | ColumnType::Float32
                | ColumnType::Float64
                | ColumnType::Bool
                | ColumnType::Bytes => Err(found(&format!("the text {}", shorten(&s)))),
                ColumnType::Decimal { precision, scale } => {
                    Ok(Value::String(decimal(&s, *precision, *scale)?))
                }
                _ => self.text_class(&s),
            },
            SqlCell::Blob(b) => match self {
                ColumnType::Bytes => Ok(Value::String(BASE64.encode(b))),
                _ => Err(found("a blob")),
            },
        }
    }

    fn int(&self, i: i64) -> Result<Value, String> {
        let (lo, hi) = match self {
            ColumnType::Int16 => (i64::from(i16::MIN), i64::from(i16::MAX)),
            ColumnType::Int32 => (i64::from(i32::MIN), i64::from(i32::MAX)),
            _ => (i64::MIN, i64::MAX),
        };
        if i < lo || i > hi {
            return Err(format!("{i} is out of range for {self} ({lo} to {hi})"));
        }
        Ok(Value::from(i))
    }

    fn float(&self, f: f64) -> Result<Value, String> {
        if f.is_nan() {
            return Err("NaN is not replicated: SQLite cannot store it (it becomes NULL)".into());
        }
        if *self == ColumnType::Float32 && f.is_finite() && f64::from(f as f32) != f {
            return Err(format!("{f:?} has no exact float32 (real) value"));
        }
        Ok(float_value(f))
    }

    /// [`ColumnType::check`] of a value the caller gives up: a string of a
    /// text or JSON column that is canonical already is kept, not copied (the
    /// apply of a received batch checks every value of every event).
    pub fn check_owned(&self, v: Value) -> Result<Value, String> {
        match v {
            Value::String(s) if self.carried_as_text() => {
                self.text_class_owned(s).map(Value::String)
            }
            v => self.check(&v),
        }
    }

    /// The classes whose values travel as strings of their text (not numbers,
    /// decimals or booleans): the ones [`ColumnType::text_class`] reads.
    fn carried_as_text(&self) -> bool {
        !(self.is_number_or_bool() || matches!(self, ColumnType::Decimal { .. }))
    }

    /// The classes carried as strings, from their text.
    fn text_class(&self, s: &str) -> Result<Value, String> {
        self.text_class_owned(s.to_owned()).map(Value::String)
    }

    /// The canonical text of a class carried as a string; `s` itself when it is
    /// canonical already (text, char without trailing spaces, JSON).
    fn text_class_owned(&self, mut s: String) -> Result<String, String> {
        Ok(match self {
            ColumnType::Text { max_chars } => {
                no_nul(&s)?;
                if let Some(max) = max_chars {
                    let n = s.chars().count();
                    if n > *max as usize {
                        return Err(format!("{n} characters, more than the column's {max}"));
                    }
                }
                s
            }
            ColumnType::Char { len } => {
                no_nul(&s)?;
                s.truncate(s.trim_end_matches(' ').len());
                let n = s.chars().count();
                if n > *len as usize {
                    return Err(format!("{n} characters, more than the column's {len}"));
                }
                s
            }
            ColumnType::Date => date(&s)?,
            ColumnType::Time => {
                let (h, m, sec, frac) = time_of_day(&s)?;
                format_time(h, m, sec, frac)
            }
            ColumnType::Timestamp => timestamp(&s, false)?,
            ColumnType::TimestampTz => timestamp(&s, true)?,
            ColumnType::Uuid => uuid(&s)?,
            ColumnType::Json => {
                if s.contains("\\u0000") {
                    return Err(nul_in_json());
                }
                serde_json::from_str::<&RawValue>(&s)
                    .map_err(|e| format!("not a JSON document: {e}"))?;
                json_number_fits(&s)?;
                s
            }
            ColumnType::Bytes => {
                let bytes = BASE64
                    .decode(&s)
                    .map_err(|e| format!("not standard base64: {e}"))?;
                BASE64.encode(bytes)
            }
            other => return Err(format!("a {other} value is not a string")),
        })
    }
}

impl FromStr for ColumnType {
    type Err = String;

    /// Parses a class name as [`ColumnType`]'s `Display` writes it.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, args) = split_type(s)?;
        let t = match (name.as_str(), args.as_slice()) {
            ("INT16", []) => ColumnType::Int16,
            ("INT32", []) => ColumnType::Int32,
            ("INT64", []) => ColumnType::Int64,
            ("FLOAT32", []) => ColumnType::Float32,
            ("FLOAT64", []) => ColumnType::Float64,
            ("DECIMAL", []) => ColumnType::Decimal {
                precision: None,
                scale: 0,
            },
            ("DECIMAL", [p]) if *p > 0 => ColumnType::Decimal {
                precision: Some(*p),
                scale: 0,
            },
            ("DECIMAL", [p, s]) if *p > 0 && s <= p => ColumnType::Decimal {
                precision: Some(*p),
                scale: *s,
            },
            ("TEXT", []) => ColumnType::Text { max_chars: None },
            ("TEXT", [n]) if *n > 0 => ColumnType::Text {
                max_chars: Some(*n),
            },
            ("CHAR", [n]) if *n > 0 => ColumnType::Char { len: *n },
            ("BOOL", []) => ColumnType::Bool,
            ("DATE", []) => ColumnType::Date,
            ("TIME", []) => ColumnType::Time,
            ("TIMESTAMP", []) => ColumnType::Timestamp,
            ("TIMESTAMPTZ", []) => ColumnType::TimestampTz,
            ("UUID", []) => ColumnType::Uuid,
            ("JSON", []) => ColumnType::Json,
            ("BYTES", []) => ColumnType::Bytes,
            _ => {
                return Err(format!(
                    "{s:?} is not a column type (int16, int32, int64, float64, decimal(p,s), \
                     text, text(n), char(n), bool, date, time, timestamp, timestamptz, uuid, \
                     json, bytes)"
                ));
            }
        };
        Ok(t)
    }
}

/// The canonical JSON of a double: a number, or a string for the values JSON
/// numbers cannot say (and for -0, which PostgreSQL's jsonb would turn into 0).
pub fn float_value(f: f64) -> Value {
    if f.is_infinite() {
        Value::String(if f > 0.0 { "Infinity" } else { "-Infinity" }.into())
    } else if f == 0.0 && f.is_sign_negative() {
        Value::String("-0".into())
    } else {
        Number::from_f64(f).map_or(Value::Null, Value::Number)
    }
}

fn special_float(s: &str) -> Result<f64, String> {
    match s {
        "Infinity" => Ok(f64::INFINITY),
        "-Infinity" => Ok(f64::NEG_INFINITY),
        "-0" => Ok(-0.0),
        "NaN" => Err("NaN is not replicated: SQLite cannot store it (it becomes NULL)".into()),
        other => Err(format!(
            "the string {} is not a number (only \"Infinity\", \"-Infinity\" and \"-0\" are)",
            shorten(other)
        )),
    }
}

/// The double a JSON number spells, correctly rounded from its text, as any
/// backend's float input reads it. PostgreSQL's jsonb writes a large
/// integral double's shortest form as an integer (`-1.152921504606847e18`
/// becomes `-1152921504606847000`), which reads back as the same double.
fn number_to_f64(n: &Number) -> Result<f64, String> {
    match n.to_string().parse::<f64>() {
        Ok(f) if f.is_finite() => Ok(f),
        _ => Err(format!("{n} is not a finite number")),
    }
}

/// A JSON document that is a bare number must be one SQLite keeps exactly, since
/// SQLite's JSON columns (NUMERIC affinity) store such a document as a 64-bit
/// integer or a double: digits a double cannot hold would be lost there.
fn json_number_fits(doc: &str) -> Result<(), String> {
    let t = doc.trim();
    if !is_number(t) || t.parse::<i64>().is_ok() {
        return Ok(());
    }
    let too_precise = || {
        format!(
            "the JSON document {} is a number no 64-bit integer or double holds exactly              (SQLite's JSON columns store a bare number as one); wrap it in an array or a string",
            shorten(t)
        )
    };
    let f: f64 = t.parse().map_err(|_| too_precise())?;
    if !f.is_finite() {
        return Err(too_precise());
    }
    let value = |text: &str| -> Result<String, String> {
        let d = decimal(text, None, 0)?;
        let d = match d.split_once('.') {
            Some((i, frac)) => {
                let frac = frac.trim_end_matches('0');
                if frac.is_empty() {
                    i.to_owned()
                } else {
                    format!("{i}.{frac}")
                }
            }
            None => d,
        };
        Ok(if d == "-0" { "0".into() } else { d })
    };
    if value(t)? == value(&format!("{f}"))? {
        Ok(())
    } else {
        Err(too_precise())
    }
}

fn is_number(text: &str) -> bool {
    text.starts_with(|c: char| c == '-' || c.is_ascii_digit())
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn shorten(s: &str) -> String {
    format!("{:?}", crate::model::truncate(s))
}

fn no_nul(s: &str) -> Result<(), String> {
    if s.contains('\0') {
        Err("the text contains a NUL character, which PostgreSQL cannot store".into())
    } else {
        Ok(())
    }
}

fn nul_in_json() -> String {
    "the JSON document contains \\u0000, which PostgreSQL's jsonb cannot store".into()
}

fn unhex(hex: &str) -> Result<Vec<u8>, String> {
    if !hex.len().is_multiple_of(2) {
        return Err("odd number of hex digits".into());
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|_| "not a hex digit".to_owned()))
        .collect()
}

/// Canonical text of a decimal: no exponent, no leading zeros, no sign on zero,
/// padded to `scale` places under a precision; refused when it has more places
/// than the scale or more digits than the precision allows.
fn decimal(s: &str, precision: Option<u32>, scale: u32) -> Result<String, String> {
    let bad = || format!("{} is not a decimal number", shorten(s));
    let (negative, body) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (mantissa, exponent) = match body.find(['e', 'E']) {
        Some(i) => {
            let e: i64 = body[i + 1..].parse().map_err(|_| bad())?;
            if e.unsigned_abs() > (PG_NUMERIC_INT_DIGITS + PG_NUMERIC_FRAC_DIGITS) as u64 {
                return Err(format!("{} has an exponent out of range", shorten(s)));
            }
            (&body[..i], e)
        }
        None => (body, 0),
    };
    let (int_part, frac_part) = match mantissa.split_once('.') {
        Some((i, f)) => (i, f),
        None => (mantissa, ""),
    };
    if (int_part.is_empty() && frac_part.is_empty())
        || !int_part.bytes().all(|b| b.is_ascii_digit())
        || !frac_part.bytes().all(|b| b.is_ascii_digit())
    {
        return Err(bad());
    }
    // Shift the decimal point by the exponent.
    let mut digits = format!("{int_part}{frac_part}");
    let mut point = int_part.len() as i64 + exponent;
    if point < 0 {
        digits = format!("{}{digits}", "0".repeat((-point) as usize));
        point = 0;
    }
    if point as usize > digits.len() {
        digits.push_str(&"0".repeat(point as usize - digits.len()));
    }
    let (int_digits, frac_digits) = digits.split_at(point as usize);
    let int_digits = int_digits.trim_start_matches('0');
    let mut frac = frac_digits.to_owned();
    if let Some(p) = precision {
        let scale = scale as usize;
        let significant = frac.trim_end_matches('0').len();
        if significant > scale {
            return Err(format!(
                "{} has {significant} decimal places, more than the column's scale of {scale}",
                shorten(s)
            ));
        }
        frac.truncate(scale.min(frac.len()));
        while frac.len() < scale {
            frac.push('0');
        }
        let allowed = p as usize - scale;
        if int_digits.len() > allowed {
            return Err(format!(
                "{} has {} digits before the decimal point, more than decimal({p},{scale}) allows ({allowed})",
                shorten(s),
                int_digits.len()
            ));
        }
    }
    if int_digits.len() > PG_NUMERIC_INT_DIGITS || frac.len() > PG_NUMERIC_FRAC_DIGITS {
        return Err(format!("{} has more digits than numeric holds", shorten(s)));
    }
    let is_zero = int_digits.is_empty() && frac.bytes().all(|b| b == b'0');
    let mut out = String::with_capacity(int_digits.len() + frac.len() + 3);
    if negative && !is_zero {
        out.push('-');
    }
    out.push_str(if int_digits.is_empty() {
        "0"
    } else {
        int_digits
    });
    if !frac.is_empty() {
        out.push('.');
        out.push_str(&frac);
    }
    Ok(out)
}

fn two(s: &str, what: &str) -> Result<u8, String> {
    if s.len() == 2 && s.bytes().all(|b| b.is_ascii_digit()) {
        s.parse().map_err(|_| what.to_owned())
    } else {
        Err(what.to_owned())
    }
}

/// `YYYY-MM-DD`, years 1 to 9999.
fn date(s: &str) -> Result<String, String> {
    let bad = || format!("{} is not a date (YYYY-MM-DD, years 1 to 9999)", shorten(s));
    let parts: Vec<&str> = s.split('-').collect();
    let [y, m, d] = parts.as_slice() else {
        return Err(bad());
    };
    if y.len() != 4 || !y.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let year: i32 = y.parse().map_err(|_| bad())?;
    let month = time::Month::try_from(two(m, "month").map_err(|_| bad())?).map_err(|_| bad())?;
    let day = two(d, "day").map_err(|_| bad())?;
    if year < 1 {
        return Err(bad());
    }
    let date = time::Date::from_calendar_date(year, month, day).map_err(|_| bad())?;
    Ok(format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        u8::from(date.month()),
        date.day()
    ))
}

/// `HH:MM[:SS[.f{1,6}]]` as (hour, minute, second, microseconds).
fn time_of_day(s: &str) -> Result<(u8, u8, u8, u32), String> {
    let bad = || format!("{} is not a time of day (HH:MM:SS[.ffffff])", shorten(s));
    let (hms, frac) = match s.split_once('.') {
        Some((a, f)) => (a, Some(f)),
        None => (s, None),
    };
    let parts: Vec<&str> = hms.split(':').collect();
    let (h, m, sec) = match parts.as_slice() {
        [h, m] => (two(h, "")?, two(m, "")?, 0),
        [h, m, sec] => (two(h, "")?, two(m, "")?, two(sec, "")?),
        _ => return Err(bad()),
    };
    if h > 23 || m > 59 || sec > 59 {
        return Err(bad());
    }
    let micros = match frac {
        None => 0,
        Some(f) if !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()) => {
            if f.trim_end_matches('0').len() > 6 {
                return Err(format!(
                    "{} has more than 6 fractional digits (PostgreSQL keeps microseconds)",
                    shorten(s)
                ));
            }
            let mut f = f.to_owned();
            f.truncate(6);
            while f.len() < 6 {
                f.push('0');
            }
            f.parse().map_err(|_| bad())?
        }
        Some(_) => return Err(bad()),
    };
    Ok((h, m, sec, micros))
}

fn format_time(h: u8, m: u8, s: u8, micros: u32) -> String {
    let mut out = format!("{h:02}:{m:02}:{s:02}");
    if micros > 0 {
        let f = format!("{micros:06}");
        out.push('.');
        out.push_str(f.trim_end_matches('0'));
    }
    out
}

/// A date and time (`T` or a space between), with an offset (`Z`, `+HH`,
/// `+HH:MM`, `+HHMM`) only when `with_zone`; canonical form in UTC for
/// timestamptz (no offset means UTC, as SQLite's date functions read it).
fn timestamp(s: &str, with_zone: bool) -> Result<String, String> {
    let bad = || {
        format!(
            "{} is not a timestamp (YYYY-MM-DDTHH:MM:SS[.ffffff]{})",
            shorten(s),
            if with_zone { "[Z|+HH:MM]" } else { "" }
        )
    };
    if s.len() < 16 {
        return Err(bad());
    }
    let (d, rest) = s.split_at(10);
    let rest = rest
        .strip_prefix('T')
        .or_else(|| rest.strip_prefix(' '))
        .ok_or_else(bad)?;
    let date_text = date(d).map_err(|_| bad())?;
    // Split off the offset.
    let (clock, offset_secs) = match rest.find(['Z', 'z', '+', '-']) {
        Some(i) => {
            if !with_zone {
                return Err(format!(
                    "{} carries a time zone, but the column is a timestamp without one",
                    shorten(s)
                ));
            }
            let zone = &rest[i..];
            let secs = match zone {
                "Z" | "z" => 0,
                _ => {
                    let sign = if zone.starts_with('-') { -1 } else { 1 };
                    let z = zone[1..].replace(':', "");
                    let (zh, zm) = match z.len() {
                        2 => (two(&z, "")?, 0),
                        4 => (two(&z[..2], "")?, two(&z[2..], "")?),
                        _ => return Err(bad()),
                    };
                    if zh > 15 || zm > 59 {
                        return Err(bad());
                    }
                    sign * (i32::from(zh) * 3600 + i32::from(zm) * 60)
                }
            };
            (&rest[..i], secs)
        }
        None => (rest, 0),
    };
    let (h, m, sec, micros) = time_of_day(clock.trim_end()).map_err(|_| bad())?;
    if !with_zone {
        return Ok(format!("{date_text}T{}", format_time(h, m, sec, micros)));
    }
    let date = time::Date::parse(
        &date_text,
        time::macros::format_description!("[year]-[month]-[day]"),
    )
    .map_err(|_| bad())?;
    let clock = time::Time::from_hms_micro(h, m, sec, micros).map_err(|_| bad())?;
    let offset = time::UtcOffset::from_whole_seconds(offset_secs).map_err(|_| bad())?;
    let utc = time::PrimitiveDateTime::new(date, clock)
        .assume_offset(offset)
        .checked_to_offset(time::UtcOffset::UTC)
        .ok_or_else(bad)?;
    if !(1..=9999).contains(&utc.year()) {
        return Err(format!(
            "{} is outside the years 1 to 9999 in UTC",
            shorten(s)
        ));
    }
    Ok(format!(
        "{:04}-{:02}-{:02}T{}Z",
        utc.year(),
        u8::from(utc.month()),
        utc.day(),
        format_time(utc.hour(), utc.minute(), utc.second(), utc.microsecond())
    ))
}

/// Lowercase, hyphenated; accepts either case, with or without hyphens.
fn uuid(s: &str) -> Result<String, String> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    let hyphens_ok = s.len() == 32
        || (s.len() == 36 && [8, 13, 18, 23].iter().all(|&i| s.as_bytes()[i] == b'-'));
    if hex.len() != 32 || !hyphens_ok || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("{} is not a UUID", shorten(s)));
    }
    let h = hex.to_ascii_lowercase();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn the_same_value_whichever_backend_spelled_it() {
        // (class, a, b, the same value?) — row hashes agree with `same`.
        let f = ColumnType::Float64;
        let j = ColumnType::Json;
        let t = ColumnType::Text { max_chars: None };
        let doc = |s: &str| json!(s);
        let cases = [
            (f, json!("-0"), json!(0.0), true),
            (f, json!(-0.0), json!(0.0), true),
            (f, json!(1.5), json!(1.5), true),
            (f, json!(1e18), json!(1_000_000_000_000_000_000_i64), true),
            (f, json!(1.5), json!(2.5), false),
            (f, json!("Infinity"), json!("-Infinity"), false),
            (
                j,
                doc(r#"{"b":[1,null],"a":-0.5e-3}"#),
                doc(r#"{"a": -0.0005, "b": [1, null]}"#),
                true,
            ),
            (j, doc(r#"{"a":1}"#), doc(r#"{"a":2}"#), false),
            // PostgreSQL's jsonb writes a number's exact decimal: an integral
            // double as an integer.
            (
                j,
                doc(r#"{"x": 85892400622418800, "l": [1.0]}"#),
                doc(r#"{"x":8.58924006224188e+16,"l":[1]}"#),
                true,
            ),
            (
                j,
                doc(r#"{"x":1.6324675820123441e+19}"#),
                doc(r#"{"x": 16324675820123441000}"#),
                true,
            ),
            (j, doc("1e20"), doc("100000000000000000000"), true),
            (j, doc(r#"["\u00e9"]"#), doc(r#"["é"]"#), true),
            (j, doc(r#"{"x": 1}"#), doc(r#"{"x": 1.5}"#), false),
            (j, doc("9007199254740993"), doc("9007199254740992.0"), false),
            (j, doc(r#"[1, 2]"#), doc(r#"[1, 2, 3]"#), false),
            (j, doc(r#"{"a": 1}"#), doc(r#"{"b": 1}"#), false),
            (j, doc(r#"["1"]"#), doc("[1]"), false),
            (t, json!("x"), json!("x"), true),
            (t, json!("x"), json!("x "), false),
            (t, json!("x"), Value::Null, false),
            (t, Value::Null, Value::Null, true),
        ];
        for (class, a, b, same) in cases {
            assert_eq!(class.same(&a, &b), same, "{class}: {a} and {b}");
            assert_eq!(
                class.hash_form(&a) == class.hash_form(&b),
                same,
                "{class} hash forms: {a} and {b}"
            );
        }
    }

    fn raw(s: &str) -> Box<RawValue> {
        RawValue::from_string(s.to_owned()).expect("raw")
    }

    #[test]
    fn declared_types_map_to_classes() {
        let sqlite = [
            ("INTEGER", "int64"),
            ("int", "int64"),
            ("BIGINT", "int64"),
            ("SMALLINT", "int16"),
            ("REAL", "float64"),
            ("DOUBLE PRECISION", "float64"),
            ("TEXT", "text"),
            ("VARCHAR(20)", "text(20)"),
            ("CHAR(26)", "char(26)"),
            ("BLOB", "bytes"),
            ("BOOLEAN", "bool"),
            ("DATE", "date"),
            ("DATETIME", "timestamptz"),
            ("TIMESTAMP", "timestamptz"),
            ("UUID", "uuid"),
            ("JSON", "json"),
        ];
        for (decl, class) in sqlite {
            assert_eq!(
                ColumnType::of_sqlite(decl).expect(decl).to_string(),
                class,
                "{decl}"
            );
        }
        let err = ColumnType::of_sqlite("DECIMAL(10,2)").expect_err("decimal");
        assert!(err.contains("not exact decimals"), "{err}");
        assert!(ColumnType::of_sqlite("").is_err());
        let pg = [
            ("smallint", "int16"),
            ("integer", "int32"),
            ("bigint", "int64"),
            ("real", "float32"),
            ("double precision", "float64"),
            ("numeric", "decimal"),
            ("numeric(40,10)", "decimal(40,10)"),
            ("text", "text"),
            ("character varying(20)", "text(20)"),
            ("character(26)", "char(26)"),
            ("boolean", "bool"),
            ("date", "date"),
            ("time without time zone", "time"),
            ("timestamp without time zone", "timestamp"),
            ("timestamp with time zone", "timestamptz"),
            ("uuid", "uuid"),
            ("jsonb", "json"),
            ("bytea", "bytes"),
        ];
        for (decl, class) in pg {
            let t = ColumnType::of_postgres(decl).expect(decl);
            assert_eq!(t.to_string(), class, "{decl}");
            assert_eq!(class.parse::<ColumnType>().expect(class), t, "{class}");
        }
        let err = ColumnType::of_postgres("integer[]").expect_err("array");
        assert!(err.contains("not replicated"), "{err}");
        let err = ColumnType::of_postgres("timestamp(3) with time zone").expect_err("p");
        assert!(err.contains("precision"), "{err}");
    }

    #[test]
    fn overrides_must_fit_the_sqlite_affinity() {
        let d: ColumnType = "decimal(10,2)".parse().expect("class");
        assert!(d.fits_sqlite("TEXT").is_ok());
        assert!(d.fits_sqlite("NUMERIC").is_err());
        assert!(ColumnType::Float64.fits_sqlite("TEXT").is_err());
        assert!(ColumnType::TimestampTz.fits_sqlite("TEXT").is_ok());
    }

    #[test]
    fn floats_are_exact_and_special_values_are_strings() {
        let f = ColumnType::Float64;
        assert_eq!(
            f.from_api(&raw("0.30000000000000004")).expect("f"),
            json!(0.30000000000000004)
        );
        assert_ne!(
            f.from_api(&raw("0.30000000000000004")).expect("f"),
            json!(0.3)
        );
        assert_eq!(f.from_api(&raw("-0.0")).expect("f"), json!("-0"));
        assert_eq!(f.check(&json!("Infinity")).expect("f"), json!("Infinity"));
        assert!(f.check(&json!("NaN")).expect_err("nan").contains("NaN"));
        assert!(f.from_sqlite(SqlCell::Real(f64::NAN)).is_err());
        // jsonb turns 1e18 into an integer; it reads back as the same double.
        assert_eq!(
            f.check(&json!(1_000_000_000_000_000_000u64)).expect("f"),
            json!(1e18)
        );
        assert!(f.from_sqlite(SqlCell::Int((1 << 53) + 1)).is_err());
        // jsonb spells -2^60 as the integer of its shortest form; the same double.
        let v = f
            .check(&json!(-1_152_921_504_606_847_000i64))
            .expect("jsonb integer form");
        assert_eq!(v, json!(-1_152_921_504_606_846_976.0));
        assert_eq!(f.to_pg_text(&json!(1e300)).expect("t"), "1e300");
        assert_eq!(f.to_pg_text(&json!("-0")).expect("t"), "-0");
        assert_eq!(
            f.to_sqlite(&json!("-Infinity")),
            SqlCell::Real(f64::NEG_INFINITY)
        );
        let r = ColumnType::Float32;
        assert!(r.check(&json!(0.1)).is_err(), "0.1 is no float32");
        assert!(r.check(&json!(f64::from(0.1f32))).is_ok());
    }

    #[test]
    fn decimals_are_exact_text() {
        let d: ColumnType = "decimal".parse().expect("class");
        let forty = "1234567890123456789012345678901234567890.0123456789";
        assert_eq!(d.from_api(&raw(forty)).expect("d"), json!(forty));
        assert_eq!(d.from_api(&raw("1.10")).expect("d"), json!("1.10"));
        assert_eq!(d.check(&json!("-0.00")).expect("d"), json!("0.00"));
        assert_eq!(d.check(&json!("1.5e3")).expect("d"), json!("1500"));
        assert_eq!(d.check(&json!("00012.5")).expect("d"), json!("12.5"));
        assert_eq!(d.check(&json!(".5")).expect("d"), json!("0.5"));
        assert!(d.check(&json!("1.2.3")).is_err());
        assert!(d.check(&json!("NaN")).is_err());
        assert!(
            d.check(&json!(1.5)).is_err(),
            "a decimal travels as a string"
        );
        let money: ColumnType = "decimal(10,2)".parse().expect("class");
        assert_eq!(money.check(&json!("1.1")).expect("m"), json!("1.10"));
        assert_eq!(money.check(&json!("-3")).expect("m"), json!("-3.00"));
        assert!(
            money
                .check(&json!("1.234"))
                .expect_err("scale")
                .contains("scale")
        );
        assert!(money.check(&json!("123456789")).is_err());
        assert_eq!(
            money.from_sqlite(SqlCell::Int(7)).expect("m"),
            json!("7.00")
        );
    }

    #[test]
    fn text_dates_and_other_strings_are_canonical() {
        let t = ColumnType::Text { max_chars: Some(3) };
        assert!(t.check(&json!("a\u{0}b")).expect_err("nul").contains("NUL"));
        assert!(t.check(&json!("abcd")).is_err());
        assert_eq!(t.check(&json!("🦀🦀🦀")).expect("t"), json!("🦀🦀🦀"));
        let c = ColumnType::Char { len: 5 };
        assert_eq!(c.check(&json!("ab   ")).expect("c"), json!("ab"));
        let ts = ColumnType::TimestampTz;
        assert_eq!(
            ts.check(&json!("2024-02-29 23:30:00.120+01:00"))
                .expect("ts"),
            json!("2024-02-29T22:30:00.12Z")
        );
        assert_eq!(
            ts.check(&json!("2024-01-01T00:00:00")).expect("ts"),
            json!("2024-01-01T00:00:00Z")
        );
        assert!(ts.check(&json!("2023-02-29T00:00:00Z")).is_err());
        assert!(ts.check(&json!("infinity")).is_err());
        let plain = ColumnType::Timestamp;
        assert!(plain.check(&json!("2024-01-01T00:00:00Z")).is_err());
        assert_eq!(
            ColumnType::Time.check(&json!("07:05")).expect("t"),
            json!("07:05:00")
        );
        assert_eq!(
            ColumnType::Date.check(&json!("0001-01-01")).expect("d"),
            json!("0001-01-01")
        );
        assert!(ColumnType::Date.check(&json!("10000-01-01")).is_err());
        assert_eq!(
            ColumnType::Uuid
                .check(&json!("A0EEBC999C0B4EF8BB6D6BB9BD380A11"))
                .expect("u"),
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11")
        );
        let j = ColumnType::Json;
        assert_eq!(
            j.from_api(&raw("{\"a\": 1.10}")).expect("j"),
            json!("{\"a\": 1.10}")
        );
        assert_eq!(j.from_api(&raw("null")).expect("j"), Value::Null);
        assert_eq!(j.check(&json!("null")).expect("j"), json!("null"));
        // A bare number SQLite's JSON column would round is refused everywhere.
        let long = "12345678901234567890123456789012345678901";
        assert!(
            j.from_api(&raw(long))
                .expect_err("long")
                .contains("no 64-bit integer or double")
        );
        assert!(j.check(&json!(long)).is_err());
        assert!(j.check(&json!("1e400")).is_err());
        for fine in [
            "1",
            "1.10",
            "-0.5",
            "9223372036854775807",
            "0.30000000000000004",
        ] {
            assert_eq!(j.check(&json!(fine)).expect(fine), json!(fine));
        }
        assert_eq!(
            j.check(&json!(format!("[{long}]"))).expect("nested"),
            json!(format!("[{long}]"))
        );
        assert!(j.check(&json!("{")).is_err());
        let b = ColumnType::Bytes;
        assert_eq!(
            b.from_pg_json(&raw("\"\\\\x00ff\"")).expect("b"),
            json!("AP8=")
        );
        assert_eq!(b.to_pg_text(&json!("AP8=")).expect("b"), "\\x00ff");
        assert_eq!(b.to_sqlite(&json!("AP8=")), SqlCell::Blob(vec![0, 255]));
        assert_eq!(b.check(&json!("")).expect("empty"), json!(""));
        assert_eq!(
            ColumnType::Bool.from_api(&raw("1")).expect("b"),
            json!(true)
        );
        assert!(ColumnType::Int16.check(&json!(40000)).is_err());
    }

    proptest! {
        /// Every finite double and infinity survives the log's JSON text, the
        /// PostgreSQL input text and SQLite storage bit for bit (-0.0 aside on
        /// SQLite, which stores it as 0.0).
        #[test]
        fn doubles_round_trip(bits in any::<u64>()) {
            let f = f64::from_bits(bits);
            prop_assume!(!f.is_nan());
            let t = ColumnType::Float64;
            let v = t.check(&float_value(f)).expect("canonical");
            let text = serde_json::to_string(&v).expect("json");
            let back: Value = serde_json::from_str(&text).expect("parse");
            let again = t.check(&back).expect("check");
            prop_assert_eq!(&again, &v);
            let SqlCell::Real(r) = t.to_sqlite(&again) else { panic!("real") };
            prop_assert_eq!(r.to_bits(), f.to_bits());
            let pg = t.to_pg_text(&again).expect("text");
            let parsed = match pg.as_str() {
                "Infinity" => f64::INFINITY,
                "-Infinity" => f64::NEG_INFINITY,
                other => other.parse::<f64>().expect("pg text"),
            };
            prop_assert_eq!(parsed.to_bits(), f.to_bits());
        }

        /// The owned check gives what the borrowing one gives (value or
        /// error), for every class and any value.
        #[test]
        fn owned_check_is_check(
            class in 0usize..17,
            v in prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::Bool),
                any::<i64>().prop_map(Value::from),
                any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
                "[ a-z0-9.:{}\\[\\]\"T+/=Z\u{0}-]{0,12}".prop_map(Value::String),
                prop_oneof![
                    Just("2024-02-29"), Just("12:30:00.5"), Just("2024-02-29T12:30:00"),
                    Just("2024-02-29T12:30:00+02:00"), Just("{\"a\": [1, 2.5]}"), Just("aGVsbG8="),
                    Just("6F9619FF-8B86-D011-B42D-00C04FC964FF"), Just("abc  "), Just("-12.50"),
                    Just("Infinity"), Just("-0"),
                ].prop_map(|s| Value::String(s.to_owned())),
            ],
        ) {
            let classes = [
                "int16", "int32", "int64", "float32", "float64", "decimal(6,2)", "decimal",
                "text", "text(3)", "char(4)", "bool", "date", "time", "timestamp",
                "timestamptz", "uuid", "json",
            ];
            let t: ColumnType = classes[class].parse().expect("class");
            prop_assert_eq!(t.check_owned(v.clone()), t.check(&v));
            let b = ColumnType::Bytes;
            prop_assert_eq!(b.check_owned(v.clone()), b.check(&v));
        }

        #[test]
        fn decimals_are_idempotent(int in "[0-9]{1,45}", frac in "[0-9]{0,20}", neg in any::<bool>()) {
            let text = format!("{}{int}{}{frac}", if neg { "-" } else { "" }, if frac.is_empty() { "" } else { "." });
            let d: ColumnType = "decimal".parse().expect("class");
            let once = d.check(&Value::String(text)).expect("decimal");
            prop_assert_eq!(d.check(&once).expect("again"), once);
        }
    }
}
