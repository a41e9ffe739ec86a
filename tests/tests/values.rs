//! Values of every column class replicate bit for bit between SQLite and
//! PostgreSQL, and values no backend can store are refused where they are written.
//!
//! * `every_class_round_trips_between_sqlite_and_postgres`: seeded random rows
//!   mixing each class's edge values (extreme integers, subnormal and infinite
//!   doubles, 40-digit decimals, astral-plane and 100 KB text, the first and last
//!   dates and instants, the JSON document `null`, a 1 MB blob, SQL NULL...) are
//!   written on either store, through the write API or by direct SQL with typed
//!   binds (captured by the triggers), then exchanged both ways through the wire
//!   conversion. Every row read back with raw sqlx on both databases equals, as
//!   a typed value, what was written, and both logs hold the same events with the
//!   same canonical values.
//! * `the_same_rows_written_on_both_backends_are_no_conflicts`: the same random
//!   rows written on both stores at once (concurrent versions of each row) make
//!   no conflict on either once exchanged, although the backends log some values
//!   differently (PostgreSQL's `jsonb` respells JSON documents, SQLite keeps no
//!   -0.0).
//! * `values_no_backend_can_store_are_refused_at_the_api`: NaN, NUL in text or
//!   JSON, a decimal beyond its scale, an out-of-range smallint and a date that
//!   does not exist are refused by `put_raw` with an error naming the table,
//!   column and class, and nothing is written.
//! * `direct_writes_no_backend_can_store_are_set_aside_and_the_queue_goes_on`:
//!   SQLite's capture triggers refuse values of the wrong storage class at the
//!   write; a malformed date (SQLite) or NaN (PostgreSQL) written directly is set
//!   aside at drain with its reason, and later writes replicate.
//!
//! The random rows come from `TIDEMARK_VALUES_SEED` (a random seed, printed, when
//! unset) and number `TIDEMARK_VALUES_ROWS` (default 60; the first 4 × the longest
//! edge list put every edge value through every store and path).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use serde_json::value::RawValue;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqliteRow};
use sqlx::{Row, TypeInfo, ValueRef};
use tidemark_hlc::{Clock, WallClock};
use tidemark_replicator::convert::{event_from_pb, event_to_pb};
use tidemark_store::{
    ColumnType, ConflictPolicy, RawValues, Store, StoreError, Values, VersionVector,
};
use tidemark_tests::TestDb;
use time::format_description::well_known::Rfc3339;
use time::macros::{date, datetime, format_description, time};
use time::{Date, OffsetDateTime, Time};
use ulid::Ulid;

const SQLITE_DDL: &str = "CREATE TABLE readings (id TEXT PRIMARY KEY, i INTEGER, s SMALLINT, \
    f REAL, d TEXT, t TEXT, vc VARCHAR(10), b BOOLEAN, dt DATE, tm TIME, ts TIMESTAMP, u UUID, \
    j JSON, bl BLOB); \
    CREATE TABLE prices (id TEXT PRIMARY KEY, amount TEXT, note TEXT)";

const PG_DDL: &str = "CREATE TABLE readings (id CHAR(26) PRIMARY KEY, i BIGINT, s SMALLINT, \
    f DOUBLE PRECISION, d NUMERIC, t TEXT, vc VARCHAR(10), b BOOLEAN, dt DATE, tm TIME, \
    ts TIMESTAMPTZ, u UUID, j JSONB, bl BYTEA); \
    CREATE TABLE prices (id CHAR(26) PRIMARY KEY, amount NUMERIC(10,2), note TEXT)";

const SQLITE_INSERT: &str = "INSERT INTO readings (id, i, s, f, d, t, vc, b, dt, tm, ts, u, j, bl) \
    VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)";

const PG_INSERT: &str = "INSERT INTO readings (id, i, s, f, d, t, vc, b, dt, tm, ts, u, j, bl) \
    VALUES ($1, $2, $3, $4, $5::numeric, $6, $7, $8, $9::date, $10::time, $11::timestamptz, \
    $12::uuid, $13::jsonb, $14)";

const SQLITE_SELECT: &str = "SELECT id, i, s, f, d, t, vc, b, dt, tm, ts, u, j, bl FROM readings";

/// Typed reads only: decimals, dates, times, UUIDs and JSON as their text (parsed
/// here), the instant as microseconds since the epoch.
const PG_SELECT: &str = "SELECT id, i, s, f, d::text, t, vc, b, dt::text, tm::text, \
    (EXTRACT(EPOCH FROM ts) * 1000000)::bigint, u::text, j::text, bl FROM readings";

/// How a column's values are written and read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Int,
    Small,
    Float,
    Decimal,
    Text,
    VarChar,
    Bool,
    Date,
    Time,
    Timestamp,
    Uuid,
    Json,
    Bytes,
}

/// The columns of `readings` after `id`: name, kind, and class on both backends.
const COLUMNS: [(&str, Kind, &str); 13] = [
    ("i", Kind::Int, "int64"),
    ("s", Kind::Small, "int16"),
    ("f", Kind::Float, "float64"),
    ("d", Kind::Decimal, "decimal"),
    ("t", Kind::Text, "text"),
    ("vc", Kind::VarChar, "text(10)"),
    ("b", Kind::Bool, "bool"),
    ("dt", Kind::Date, "date"),
    ("tm", Kind::Time, "time"),
    ("ts", Kind::Timestamp, "timestamptz"),
    ("u", Kind::Uuid, "uuid"),
    ("j", Kind::Json, "json"),
    ("bl", Kind::Bytes, "bytes"),
];

/// The position of column `name` in [`COLUMNS`].
fn col(name: &str) -> usize {
    COLUMNS
        .iter()
        .position(|c| c.0 == name)
        .unwrap_or_else(|| panic!("no column {name}"))
}

// ---------------------------------------------------------------------------------
// Typed values

/// A column value as written or as read back from a database.
#[derive(Clone)]
enum Val {
    Null,
    Int(i64),
    Float(f64),
    /// Decimal text as written (`"1.10"`); compared numerically.
    Decimal(String),
    Text(String),
    Bool(bool),
    Date(Date),
    Time(Time),
    /// Microseconds since the Unix epoch.
    Timestamp(i64),
    Uuid(u128),
    /// The document's text; compared parsed, numbers by their exact digits.
    Json(String),
    Bytes(Vec<u8>),
    /// What a database held that is no value of the column's class.
    Unreadable(String),
}

impl PartialEq for Val {
    fn eq(&self, other: &Val) -> bool {
        match (self, other) {
            (Val::Null, Val::Null) => true,
            (Val::Int(a), Val::Int(b)) => a == b,
            // `==`: -0.0 equals 0.0 (SQLite stores -0.0 as 0.0); NaN is never
            // written, so any other pair is equal only when bit-identical.
            (Val::Float(a), Val::Float(b)) => a == b,
            (Val::Decimal(a), Val::Decimal(b)) => {
                matches!((decimal_digits(a), decimal_digits(b)), (Some(x), Some(y)) if x == y)
            }
            (Val::Text(a), Val::Text(b)) => a == b,
            (Val::Bool(a), Val::Bool(b)) => a == b,
            (Val::Date(a), Val::Date(b)) => a == b,
            (Val::Time(a), Val::Time(b)) => a == b,
            (Val::Timestamp(a), Val::Timestamp(b)) => a == b,
            (Val::Uuid(a), Val::Uuid(b)) => a == b,
            (Val::Json(a), Val::Json(b)) => {
                matches!((parse_doc(a), parse_doc(b)), (Ok(x), Ok(y)) if x == y)
            }
            (Val::Bytes(a), Val::Bytes(b)) => a == b,
            _ => false,
        }
    }
}

/// Text cut to a readable length for messages.
fn short(s: &str) -> String {
    const MAX: usize = 60;
    let n = s.chars().count();
    if n <= MAX {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head:?}… ({n} chars)")
    }
}

impl fmt::Debug for Val {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Val::Null => f.write_str("NULL"),
            Val::Int(i) => write!(f, "{i}"),
            Val::Float(x) => write!(f, "{x:?} (bits {:#018x})", x.to_bits()),
            Val::Decimal(d) => write!(f, "decimal {}", short(d)),
            Val::Text(s) => write!(f, "text {}", short(s)),
            Val::Bool(b) => write!(f, "{b}"),
            Val::Date(d) => write!(f, "date {}", fmt_date(*d)),
            Val::Time(t) => write!(f, "time {}", fmt_time(*t)),
            Val::Timestamp(us) => write!(f, "instant {} ({us} µs)", fmt_timestamp(*us)),
            Val::Uuid(u) => write!(f, "uuid {}", fmt_uuid(*u, false)),
            Val::Json(doc) => write!(f, "json {}", short(doc)),
            Val::Bytes(b) if b.len() > 16 => write!(f, "{} bytes {:02x?}…", b.len(), &b[..16]),
            Val::Bytes(b) => write!(f, "{} bytes {b:02x?}", b.len()),
            Val::Unreadable(what) => write!(f, "unreadable: {what}"),
        }
    }
}

fn fmt_date(d: Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

/// `HH:MM:SS`, with all six fractional digits when there is a fraction (not the
/// canonical form, which drops trailing zeros: both must be read the same).
fn fmt_time(t: Time) -> String {
    let mut s = format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second());
    if t.microsecond() > 0 {
        s.push_str(&format!(".{:06}", t.microsecond()));
    }
    s
}

fn fmt_timestamp(micros: i64) -> String {
    let t = OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .expect("instant in range");
    format!("{}T{}Z", fmt_date(t.date()), fmt_time(t.time()))
}

fn fmt_uuid(u: u128, upper: bool) -> String {
    let h = format!("{u:032x}");
    let s = format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    );
    if upper { s.to_uppercase() } else { s }
}

fn micros(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1000).expect("micros fit i64")
}

/// A decimal's value as `[-]int[.frac]` without leading or trailing zeros (an
/// exponent shifts the point), so `"1.10"`, `"1.1"` and `"0.011e2"` agree.
fn decimal_digits(s: &str) -> Option<String> {
    let (negative, body) = match s.strip_prefix('-') {
        Some(b) => (true, b),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let (mantissa, exponent) = match body.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i64>().ok()?),
        None => (body, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) {
        return None;
    }
    let all = format!("{int}{frac}");
    let point = int.len() as i64 + exponent;
    let (int, frac) = if point <= 0 {
        (
            String::new(),
            format!("{}{all}", "0".repeat(point.unsigned_abs() as usize)),
        )
    } else if point as usize >= all.len() {
        (
            format!("{all}{}", "0".repeat(point as usize - all.len())),
            String::new(),
        )
    } else {
        let (i, f) = all.split_at(point as usize);
        (i.to_owned(), f.to_owned())
    };
    let (int, frac) = (int.trim_start_matches('0'), frac.trim_end_matches('0'));
    let sign = if negative && !(int.is_empty() && frac.is_empty()) {
        "-"
    } else {
        ""
    };
    let int = if int.is_empty() { "0" } else { int };
    Some(if frac.is_empty() {
        format!("{sign}{int}")
    } else {
        format!("{sign}{int}.{frac}")
    })
}

/// A parsed JSON document whose numbers keep every digit (serde_json's `Value`
/// would round them to doubles and hide a lost digit).
#[derive(Debug, PartialEq)]
enum Doc {
    Null,
    Bool(bool),
    /// Normalized by [`decimal_digits`].
    Number(String),
    String(String),
    Array(Vec<Doc>),
    Object(BTreeMap<String, Doc>),
}

fn parse_doc(text: &str) -> Result<Doc, String> {
    let mut p = DocParser { text, at: 0 };
    let doc = p.value()?;
    p.skip_ws();
    if p.at == text.len() {
        Ok(doc)
    } else {
        Err(format!("trailing text at byte {} of {}", p.at, short(text)))
    }
}

struct DocParser<'a> {
    text: &'a str,
    at: usize,
}

impl DocParser<'_> {
    fn peek(&self) -> Option<u8> {
        self.text.as_bytes().get(self.at).copied()
    }

    fn skip_ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\n' | b'\r' | b'\t')) {
            self.at += 1;
        }
    }

    fn expect(&mut self, byte: u8) -> Result<(), String> {
        self.skip_ws();
        if self.peek() == Some(byte) {
            self.at += 1;
            Ok(())
        } else {
            Err(format!("expected {:?} at byte {}", byte as char, self.at))
        }
    }

    /// Consumes `byte` if it comes next.
    fn eat(&mut self, byte: u8) -> bool {
        self.skip_ws();
        let found = self.peek() == Some(byte);
        if found {
            self.at += 1;
        }
        found
    }

    fn value(&mut self) -> Result<Doc, String> {
        self.skip_ws();
        let rest = &self.text[self.at..];
        for (word, doc) in [
            ("true", Doc::Bool(true)),
            ("false", Doc::Bool(false)),
            ("null", Doc::Null),
        ] {
            if rest.starts_with(word) {
                self.at += word.len();
                return Ok(doc);
            }
        }
        match self.peek() {
            Some(b'"') => self.string().map(Doc::String),
            Some(b'[') => {
                self.at += 1;
                let mut items = Vec::new();
                if !self.eat(b']') {
                    loop {
                        items.push(self.value()?);
                        if !self.eat(b',') {
                            self.expect(b']')?;
                            break;
                        }
                    }
                }
                Ok(Doc::Array(items))
            }
            Some(b'{') => {
                self.at += 1;
                let mut members = BTreeMap::new();
                if !self.eat(b'}') {
                    loop {
                        self.skip_ws();
                        let key = self.string()?;
                        self.expect(b':')?;
                        members.insert(key, self.value()?);
                        if !self.eat(b',') {
                            self.expect(b'}')?;
                            break;
                        }
                    }
                }
                Ok(Doc::Object(members))
            }
            _ => {
                let len = rest
                    .bytes()
                    .take_while(|b| b"+-.eE0123456789".contains(b))
                    .count();
                self.at += len;
                decimal_digits(&rest[..len])
                    .map(Doc::Number)
                    .ok_or_else(|| format!("not a JSON value at byte {}", self.at - len))
            }
        }
    }

    fn string(&mut self) -> Result<String, String> {
        let start = self.at;
        if self.peek() != Some(b'"') {
            return Err(format!("expected a string at byte {start}"));
        }
        self.at += 1;
        loop {
            match self.peek() {
                Some(b'\\') => self.at += 2,
                Some(b'"') => break,
                Some(_) => self.at += 1,
                None => return Err("unterminated string".into()),
            }
        }
        self.at += 1;
        serde_json::from_str(&self.text[start..self.at]).map_err(|e| e.to_string())
    }
}

// ---------------------------------------------------------------------------------
// Generated rows

/// One row of `readings` and where and how it is written.
struct Sample {
    id: Ulid,
    on_pg: bool,
    /// Direct SQL (captured by the triggers) rather than the write API.
    direct: bool,
    /// Alternative spellings: decimals as JSON numbers, UUIDs in upper case.
    alt: bool,
    values: Vec<Val>,
}

impl Sample {
    fn origin(&self) -> String {
        format!(
            "{} on {}",
            self.id,
            match (self.on_pg, self.direct) {
                (false, false) => "SQLite via the API",
                (true, false) => "PostgreSQL via the API",
                (false, true) => "SQLite via direct SQL",
                (true, true) => "PostgreSQL via direct SQL",
            }
        )
    }
}

fn random_text(rng: &mut ChaCha8Rng, max_chars: usize) -> String {
    let n = rng.random_range(0..=max_chars);
    let ascii = rng.random_bool(0.5);
    (0..n)
        .map(|_| {
            loop {
                let c: char = if ascii {
                    rng.random_range(' '..='~')
                } else {
                    rng.random()
                };
                if c != '\0' {
                    break c;
                }
            }
        })
        .collect()
}

fn random_bytes(rng: &mut ChaCha8Rng, len: usize) -> Vec<u8> {
    let mut bytes = vec![0; len];
    rng.fill(&mut bytes[..]);
    bytes
}

fn random_double(rng: &mut ChaCha8Rng) -> f64 {
    loop {
        let f = f64::from_bits(rng.random());
        if !f.is_nan() {
            break f;
        }
    }
}

/// Up to 45 integer and 20 fractional digits, no leading zeros.
fn random_decimal(rng: &mut ChaCha8Rng) -> String {
    let digit = |rng: &mut ChaCha8Rng, from: u8| char::from(b'0' + rng.random_range(from..10));
    let int_len = rng.random_range(1..=45);
    let mut s = String::new();
    if rng.random_bool(0.5) {
        s.push('-');
    }
    s.push(digit(rng, if int_len == 1 { 0 } else { 1 }));
    for _ in 1..int_len {
        s.push(digit(rng, 0));
    }
    let frac_len = rng.random_range(0..=20);
    if frac_len > 0 {
        s.push('.');
        for _ in 0..frac_len {
            s.push(digit(rng, 0));
        }
    }
    s
}

fn random_val(kind: Kind, rng: &mut ChaCha8Rng) -> Val {
    let first_day = date!(0001 - 01 - 01).to_julian_day();
    let last_day = date!(9999 - 12 - 31).to_julian_day();
    match kind {
        Kind::Int => Val::Int(rng.random()),
        Kind::Small => Val::Int(rng.random::<i16>().into()),
        Kind::Float => Val::Float(random_double(rng)),
        Kind::Decimal => Val::Decimal(random_decimal(rng)),
        Kind::Text => Val::Text(random_text(rng, 200)),
        Kind::VarChar => Val::Text(random_text(rng, 10)),
        Kind::Bool => Val::Bool(rng.random()),
        Kind::Date => {
            Val::Date(Date::from_julian_day(rng.random_range(first_day..=last_day)).expect("date"))
        }
        Kind::Time => Val::Time(
            Time::from_hms_micro(
                rng.random_range(0..24),
                rng.random_range(0..60),
                rng.random_range(0..60),
                rng.random_range(0..1_000_000),
            )
            .expect("time"),
        ),
        Kind::Timestamp => Val::Timestamp(rng.random_range(
            micros(datetime!(0001-01-01 0:00 UTC))
                ..=micros(datetime!(9999-12-31 23:59:59.999999 UTC)),
        )),
        Kind::Uuid => Val::Uuid(rng.random()),
        Kind::Json => {
            let x = loop {
                let x = random_double(rng);
                if x.is_finite() {
                    break x;
                }
            };
            let doc = json!({
                "n": rng.random::<i64>(),
                "x": x,
                "s": random_text(rng, 12),
                "l": [rng.random::<bool>(), null, []],
            });
            Val::Json(doc.to_string())
        }
        Kind::Bytes => {
            let len = rng.random_range(0..256);
            Val::Bytes(random_bytes(rng, len))
        }
    }
}

/// The edge values of a class, SQL NULL last.
fn edge_values(kind: Kind, rng: &mut ChaCha8Rng) -> Vec<Val> {
    let texts = |items: &[&str]| items.iter().map(|s| Val::Text((*s).to_owned())).collect();
    let mut edges: Vec<Val> = match kind {
        Kind::Int => vec![
            Val::Int(i64::MIN),
            Val::Int(i64::MAX),
            Val::Int(0),
            Val::Int(-1),
        ],
        Kind::Small => vec![Val::Int(-32768), Val::Int(32767), Val::Int(0)],
        Kind::Float => [
            0.1 + 0.2,
            -0.0,
            5e-324,
            2.2250738585072014e-308,
            1.7976931348623157e308,
            1e308,
            // 2^60: integer-valued beyond 2^53, its shortest digits
            // (1.152921504606847e18) are not its exact value.
            -1152921504606846976.0,
            f64::INFINITY,
            f64::NEG_INFINITY,
        ]
        .into_iter()
        .map(Val::Float)
        .collect(),
        Kind::Decimal => [
            "1234567890123456789012345678901234567890.0123456789",
            "-98765432109876543210987654321098765432109876",
            "0.000000000000000000000000000000000000000001",
            "1.10",
            "-12.50",
            "0",
        ]
        .into_iter()
        .map(|d| Val::Decimal(d.to_owned()))
        .collect(),
        Kind::Text => {
            let mut big = String::new();
            while big.len() < 100 * 1024 {
                big.push_str("tidemark 🦀 'quoted' \"double\" \\ back\nslash\r\n\t");
            }
            let mut v: Vec<Val> = texts(&[
                "",
                "🦀 𝄞 😀 astral plane",
                "it's \"quoted\" `back` \\ slash",
                "line one\nline two\r\n\ttabbed",
            ]);
            v.push(Val::Text(big));
            v
        }
        Kind::VarChar => texts(&["", "0123456789", "🦀🦀🦀🦀🦀🦀🦀🦀🦀🦀"]),
        Kind::Bool => vec![Val::Bool(true), Val::Bool(false)],
        Kind::Date => [
            date!(0001 - 01 - 01),
            date!(9999 - 12 - 31),
            date!(2024 - 02 - 29),
        ]
        .into_iter()
        .map(Val::Date)
        .collect(),
        Kind::Time => vec![
            Val::Time(time!(00:00:00)),
            Val::Time(time!(23:59:59.999999)),
        ],
        Kind::Timestamp => [
            datetime!(0001-01-01 0:00 UTC),
            datetime!(9999-12-31 23:59:59.999999 UTC),
            datetime!(1970-01-01 0:00 UTC),
        ]
        .into_iter()
        .map(|t| Val::Timestamp(micros(t)))
        .collect(),
        Kind::Uuid => vec![Val::Uuid(0), Val::Uuid(u128::MAX)],
        Kind::Json => [
            r#"{"a": 1.10, "b": [true, null]}"#,
            "null",
            // Inside a document every digit is kept; a bare number must fit a
            // double (SQLite's JSON columns store it as one), see the refusals.
            "[12345678901234567890123456789012345678901]",
            "-0.5",
            r#""str""#,
            r#"{"nested": {"🦀": "a\nb \u00e9", "n": -0.5e-3}, "empty": [{}, []]}"#,
        ]
        .into_iter()
        .map(|d| Val::Json(d.to_owned()))
        .collect(),
        Kind::Bytes => vec![
            Val::Bytes(Vec::new()),
            Val::Bytes(random_bytes(rng, 37)),
            Val::Bytes(random_bytes(rng, 1 << 20)),
        ],
    };
    edges.push(Val::Null);
    edges
}

/// `count` rows: the first ones go through each column's edge values in turn,
/// four rows per step (SQLite and PostgreSQL, API and direct SQL); the rest mix
/// random values with edge values.
fn generate(rng: &mut ChaCha8Rng, count: usize) -> Vec<Sample> {
    let edges: Vec<Vec<Val>> = COLUMNS.iter().map(|c| edge_values(c.1, rng)).collect();
    let edge_rows = 4 * edges.iter().map(Vec::len).max().unwrap_or(0);
    (0..count)
        .map(|r| {
            let direct = r % 4 >= 2;
            let values = COLUMNS
                .iter()
                .zip(&edges)
                .enumerate()
                .map(|(c, ((_, kind, _), edges))| {
                    let v = if r < edge_rows {
                        edges[(r / 4 + c) % edges.len()].clone()
                    } else if rng.random_bool(0.3) {
                        edges[rng.random_range(0..edges.len())].clone()
                    } else {
                        random_val(*kind, rng)
                    };
                    // Through the API a JSON `null` is SQL NULL: the document
                    // `null` comes only from direct writes (and peers). API rows
                    // get the string document "null" instead, a third value that
                    // must stay distinct from both.
                    match v {
                        Val::Json(doc) if !direct && doc == "null" => Val::Json(r#""null""#.into()),
                        v => v,
                    }
                })
                .collect();
            Sample {
                id: Ulid::generate(),
                on_pg: r % 2 == 1,
                direct,
                alt: rng.random(),
                values,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------
// Writing and reading

/// A value as text, for the classes that travel as strings.
fn text_form(v: &Val, alt: bool) -> String {
    match v {
        Val::Decimal(s) | Val::Text(s) | Val::Json(s) => s.clone(),
        Val::Date(d) => fmt_date(*d),
        Val::Time(t) => fmt_time(*t),
        Val::Timestamp(us) => fmt_timestamp(*us),
        Val::Uuid(u) => fmt_uuid(*u, alt),
        other => panic!("{other:?} is not written as text"),
    }
}

/// A value as an application writes it to the API (see `ColumnType::from_api`).
fn api_json(v: &Val, alt: bool) -> String {
    let quoted = |s: &str| serde_json::to_string(s).expect("JSON string");
    match v {
        Val::Null => "null".into(),
        Val::Int(i) => i.to_string(),
        Val::Float(f) if f.is_infinite() => quoted(if *f > 0.0 { "Infinity" } else { "-Infinity" }),
        Val::Float(f) if *f == 0.0 && f.is_sign_negative() => quoted("-0"),
        Val::Float(f) => format!("{f:?}"),
        Val::Decimal(d) if alt => d.clone(),
        Val::Bool(b) => b.to_string(),
        Val::Json(doc) => doc.clone(),
        Val::Bytes(b) => quoted(&BASE64.encode(b)),
        other => quoted(&text_form(other, alt)),
    }
}

/// Raw values for `put_raw` from `(column, JSON text)` pairs.
fn raw_values(pairs: &[(&str, &str)]) -> RawValues {
    pairs
        .iter()
        .map(|(c, text)| {
            let raw =
                RawValue::from_string((*text).to_owned()).unwrap_or_else(|e| panic!("{text}: {e}"));
            ((*c).to_owned(), raw)
        })
        .collect()
}

/// A pool on a test database, apart from the store's.
enum Direct {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

impl Direct {
    async fn connect(db: &TestDb) -> Direct {
        match db.kind() {
            "sqlite" => {
                let options = SqliteConnectOptions::from_str(&db.url())
                    .expect("sqlite url")
                    .busy_timeout(Duration::from_secs(10));
                Direct::Sqlite(
                    SqlitePool::connect_with(options)
                        .await
                        .expect("sqlite pool"),
                )
            }
            _ => Direct::Postgres(PgPool::connect(&db.url()).await.expect("postgres pool")),
        }
    }

    /// Inserts the row with typed binds (SQLite stores booleans as 0 / 1).
    async fn insert(&self, row: &Sample) -> Result<(), sqlx::Error> {
        match self {
            Direct::Sqlite(pool) => {
                let mut q = sqlx::query(SQLITE_INSERT).bind(row.id.to_string());
                for v in &row.values {
                    q = match v {
                        Val::Null => q.bind(None::<i64>),
                        Val::Int(i) => q.bind(*i),
                        Val::Float(f) => q.bind(*f),
                        Val::Bool(b) => q.bind(i64::from(*b)),
                        Val::Bytes(b) => q.bind(b.clone()),
                        other => q.bind(text_form(other, row.alt)),
                    };
                }
                q.execute(pool).await.map(drop)
            }
            Direct::Postgres(pool) => {
                let mut q = sqlx::query(PG_INSERT).bind(row.id.to_string());
                for ((_, kind, _), v) in COLUMNS.iter().zip(&row.values) {
                    q = match (kind, v) {
                        (Kind::Small, Val::Int(i)) => q.bind(i16::try_from(*i).expect("smallint")),
                        (_, Val::Int(i)) => q.bind(*i),
                        (_, Val::Float(f)) => q.bind(*f),
                        (_, Val::Bool(b)) => q.bind(*b),
                        (_, Val::Bytes(b)) => q.bind(b.clone()),
                        (Kind::Int, Val::Null) => q.bind(None::<i64>),
                        (Kind::Small, Val::Null) => q.bind(None::<i16>),
                        (Kind::Float, Val::Null) => q.bind(None::<f64>),
                        (Kind::Bool, Val::Null) => q.bind(None::<bool>),
                        (Kind::Bytes, Val::Null) => q.bind(None::<Vec<u8>>),
                        (_, Val::Null) => q.bind(None::<String>),
                        (_, other) => q.bind(text_form(other, row.alt)),
                    };
                }
                q.execute(pool).await.map(drop)
            }
        }
    }

    /// Every row of `readings`, typed, by id.
    async fn read_all(&self) -> BTreeMap<Ulid, Vec<Val>> {
        let key = |id: String| Ulid::from_string(id.trim()).expect("row id");
        match self {
            Direct::Sqlite(pool) => sqlx::query(SQLITE_SELECT)
                .fetch_all(pool)
                .await
                .expect("read SQLite rows")
                .iter()
                .map(|row| {
                    let values = (0..COLUMNS.len()).map(|c| sqlite_val(row, c)).collect();
                    (key(row.get(0)), values)
                })
                .collect(),
            Direct::Postgres(pool) => sqlx::query(PG_SELECT)
                .fetch_all(pool)
                .await
                .expect("read PostgreSQL rows")
                .iter()
                .map(|row| {
                    let values = (0..COLUMNS.len()).map(|c| pg_val(row, c)).collect();
                    (key(row.get(0)), values)
                })
                .collect(),
        }
    }
}

/// A value of a text-carried class from the text a database holds.
fn parse_text(kind: Kind, s: String) -> Val {
    let parsed = match kind {
        Kind::Decimal if decimal_digits(&s).is_some() => Ok(Val::Decimal(s.clone())),
        Kind::Text | Kind::VarChar => return Val::Text(s),
        Kind::Json => return Val::Json(s),
        Kind::Date => Date::parse(&s, format_description!("[year]-[month]-[day]"))
            .map(Val::Date)
            .map_err(|e| e.to_string()),
        Kind::Time => Time::parse(
            &s,
            format_description!("[hour]:[minute]:[second][optional [.[subsecond]]]"),
        )
        .map(Val::Time)
        .map_err(|e| e.to_string()),
        Kind::Timestamp => OffsetDateTime::parse(&s, &Rfc3339)
            .map(|t| Val::Timestamp(micros(t)))
            .map_err(|e| e.to_string()),
        Kind::Uuid if s.len() == 36 => u128::from_str_radix(&s.replace('-', ""), 16)
            .map(Val::Uuid)
            .map_err(|e| e.to_string()),
        _ => Err(format!("not a {kind:?}")),
    };
    parsed.unwrap_or_else(|e| Val::Unreadable(format!("the text {}: {e}", short(&s))))
}

/// Column `c` of a SQLite row, by the storage class SQLite holds it in.
fn sqlite_val(row: &SqliteRow, c: usize) -> Val {
    let i = c + 1;
    let raw = row.try_get_raw(i).expect("raw value");
    if raw.is_null() {
        return Val::Null;
    }
    let class = raw.type_info().name().to_owned();
    let kind = COLUMNS[c].1;
    match (kind, class.as_str()) {
        (Kind::Int | Kind::Small, "INTEGER") => Val::Int(row.try_get_unchecked(i).expect("int")),
        (Kind::Float, "REAL") => Val::Float(row.try_get_unchecked(i).expect("real")),
        (Kind::Bool, "INTEGER") => match row.try_get_unchecked::<i64, _>(i).expect("int") {
            0 => Val::Bool(false),
            1 => Val::Bool(true),
            other => Val::Unreadable(format!("the integer {other} in a BOOLEAN column")),
        },
        (Kind::Bytes, "BLOB") => Val::Bytes(row.try_get_unchecked(i).expect("blob")),
        // A JSON column has NUMERIC affinity: a document that is a bare number is
        // stored as one.
        (Kind::Json, "INTEGER") => {
            Val::Json(row.try_get_unchecked::<i64, _>(i).expect("int").to_string())
        }
        (Kind::Json, "REAL") => Val::Json(format!(
            "{:?}",
            row.try_get_unchecked::<f64, _>(i).expect("real")
        )),
        (
            Kind::Decimal
            | Kind::Text
            | Kind::VarChar
            | Kind::Date
            | Kind::Time
            | Kind::Timestamp
            | Kind::Uuid
            | Kind::Json,
            "TEXT",
        ) => parse_text(kind, row.try_get_unchecked(i).expect("text")),
        (_, class) => {
            let text = row
                .try_get_unchecked::<String, _>(i)
                .map_or_else(|_| "not UTF-8".to_owned(), |s| short(&s));
            Val::Unreadable(format!("SQLite holds {class} {text}"))
        }
    }
}

/// Column `c` of a row of [`PG_SELECT`].
fn pg_val(row: &PgRow, c: usize) -> Val {
    let i = c + 1;
    let kind = COLUMNS[c].1;
    let what = || format!("PostgreSQL column {}", COLUMNS[c].0);
    let v = match kind {
        Kind::Int | Kind::Timestamp => {
            let v: Option<i64> = row.try_get(i).unwrap_or_else(|e| panic!("{}: {e}", what()));
            v.map(|v| {
                if kind == Kind::Int {
                    Val::Int(v)
                } else {
                    Val::Timestamp(v)
                }
            })
        }
        Kind::Small => row
            .try_get::<Option<i16>, _>(i)
            .unwrap_or_else(|e| panic!("{}: {e}", what()))
            .map(|s| Val::Int(s.into())),
        Kind::Float => row
            .try_get::<Option<f64>, _>(i)
            .unwrap_or_else(|e| panic!("{}: {e}", what()))
            .map(Val::Float),
        Kind::Bool => row
            .try_get::<Option<bool>, _>(i)
            .unwrap_or_else(|e| panic!("{}: {e}", what()))
            .map(Val::Bool),
        Kind::Bytes => row
            .try_get::<Option<Vec<u8>>, _>(i)
            .unwrap_or_else(|e| panic!("{}: {e}", what()))
            .map(Val::Bytes),
        _ => row
            .try_get::<Option<String>, _>(i)
            .unwrap_or_else(|e| panic!("{}: {e}", what()))
            .map(|s| parse_text(kind, s)),
    };
    v.unwrap_or(Val::Null)
}

// ---------------------------------------------------------------------------------
// Stores

/// Creates `readings` and `prices` and opens a store replicating both (on
/// SQLite, the TEXT columns holding decimals carry a type override).
async fn setup(db: &TestDb) -> Store {
    let sqlite = db.kind() == "sqlite";
    db.sql(if sqlite { SQLITE_DDL } else { PG_DDL });
    let clock = Clock::new(Ulid::generate(), 5_000, WallClock::System).expect("clock");
    let store = db.open(Arc::new(clock)).await.expect("open store");
    let class = |c: &str| c.parse::<ColumnType>().expect("class");
    for (table, column, override_class) in [
        ("readings", "d", "decimal"),
        ("prices", "amount", "decimal(10,2)"),
    ] {
        let overrides = if sqlite {
            BTreeMap::from([(column.to_owned(), class(override_class))])
        } else {
            BTreeMap::new()
        };
        store
            .register_table_with(table, ConflictPolicy::Lww, &overrides)
            .await
            .unwrap_or_else(|e| panic!("register {table} on {}: {e}", db.kind()));
    }
    store
}

/// Sends every event of each store to the other through the wire conversion;
/// returns what the receiving side quarantined.
async fn exchange(a: &Store, b: &Store) -> Vec<String> {
    let mut quarantined = Vec::new();
    for (from, to) in [(a, b), (b, a)] {
        let events: Vec<_> = from
            .events_after(&VersionVector::new(), 1_000_000)
            .await
            .expect("events")
            .iter()
            .map(|e| event_from_pb(event_to_pb(e)).unwrap_or_else(|e| panic!("wire: {e}")))
            .collect();
        let outcome = to.apply_remote(&events).await.unwrap_or_else(|e| {
            panic!("{} applying the events of {}: {e}", to.kind(), from.kind())
        });
        quarantined.extend(outcome.quarantined.into_iter().map(|r| {
            format!(
                "{} quarantined event {} of {}: {}",
                to.kind(),
                r.event_id,
                from.kind(),
                r.reason
            )
        }));
    }
    quarantined
}

/// The `readings` events in a store's log: event id → (record id, new values in
/// their canonical form for the table's classes). A logged value that is not one
/// of its class is a problem (and is kept as logged).
async fn logged(store: &Store, problems: &mut Vec<String>) -> BTreeMap<Ulid, (Ulid, Values)> {
    let table = store.table("readings").expect("readings");
    let events = store
        .events_after(&VersionVector::new(), 1_000_000)
        .await
        .expect("events");
    let mut log = BTreeMap::new();
    for e in events.into_iter().filter(|e| e.table_name == "readings") {
        let mut values = e.new_values.unwrap_or_default();
        for (c, v) in values.iter_mut() {
            let class = table
                .column_type(c)
                .unwrap_or_else(|| panic!("logged column {c}"));
            match class.check(v) {
                Ok(canonical) => *v = canonical,
                Err(reason) => problems.push(format!(
                    "{} logged event {} (row {}) column {c} ({class}) as {}, which it refuses as a value: {reason}",
                    store.kind(),
                    e.event_id,
                    e.record_id,
                    short(&v.to_string())
                )),
            }
        }
        log.insert(e.event_id, (e.record_id, values));
    }
    log
}

/// Writes `row` on `store`: by direct SQL (then drained) or through the
/// write API, as the sample says.
async fn write_row(store: &Store, sql: &Direct, row: &Sample) -> Result<(), String> {
    if row.direct {
        match sql.insert(row).await {
            Ok(()) => match store.drain().await {
                Ok(d) if d.events == 1 && d.set_aside.is_empty() => Ok(()),
                Ok(d) => Err(format!(
                    "drained {} events, set aside {:?}",
                    d.events, d.set_aside
                )),
                Err(e) => Err(format!("drain: {e}")),
            },
            Err(e) => Err(format!("insert: {e}")),
        }
    } else {
        let pairs: Vec<(&str, String)> = COLUMNS
            .iter()
            .zip(&row.values)
            .map(|((c, ..), v)| (*c, api_json(v, row.alt)))
            .collect();
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(c, t)| (*c, t.as_str())).collect();
        store
            .put_raw("readings", row.id, raw_values(&pairs))
            .await
            .map(drop)
            .map_err(|e| format!("put_raw: {e}"))
    }
}

fn short_json(v: Option<&serde_json::Value>) -> String {
    v.map_or("absent".into(), |v| short(&v.to_string()))
}

/// The random rows of a run: `TIDEMARK_VALUES_ROWS` of them (default 60)
/// from `TIDEMARK_VALUES_SEED` (random when unset), both printed.
fn random_rows() -> (u64, Vec<Sample>) {
    let seed = seed();
    let count: usize = std::env::var("TIDEMARK_VALUES_ROWS").map_or(60, |n| {
        n.parse().expect("TIDEMARK_VALUES_ROWS must be a number")
    });
    eprintln!("TIDEMARK_VALUES_SEED={seed} TIDEMARK_VALUES_ROWS={count}");
    (seed, generate(&mut ChaCha8Rng::seed_from_u64(seed), count))
}

fn seed() -> u64 {
    match std::env::var("TIDEMARK_VALUES_SEED") {
        Ok(s) => s.parse().expect("TIDEMARK_VALUES_SEED must be a u64"),
        Err(_) => rand::rng().random(),
    }
}

// ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_class_round_trips_between_sqlite_and_postgres() {
    let (seed, rows) = random_rows();

    let (lite_db, pg_db) = (TestDb::sqlite(), TestDb::postgres());
    let (lite, pg) = (setup(&lite_db).await, setup(&pg_db).await);
    let expected: Vec<&str> = std::iter::once("id")
        .chain(COLUMNS.iter().map(|c| c.0))
        .collect();
    let classes: Vec<&str> = std::iter::once("text")
        .chain(COLUMNS.iter().map(|c| c.2))
        .collect();
    for store in [&lite, &pg] {
        let table = store.table("readings").expect("readings");
        assert_eq!(table.columns, expected, "{} columns", store.kind());
        let types: Vec<String> = table.types.iter().map(ToString::to_string).collect();
        assert_eq!(types, classes, "{} classes", store.kind());
    }
    let (lite_sql, pg_sql) = (
        Direct::connect(&lite_db).await,
        Direct::connect(&pg_db).await,
    );

    let mut problems = Vec::new();
    let mut written = Vec::new();
    for row in &rows {
        let outcome = if row.on_pg {
            write_row(&pg, &pg_sql, row).await
        } else {
            write_row(&lite, &lite_sql, row).await
        };
        match outcome {
            Ok(()) => written.push(row),
            Err(e) => problems.push(format!(
                "row {} {:?} refused: {e}",
                row.origin(),
                row.values
            )),
        }
    }

    problems.extend(exchange(&lite, &pg).await);

    let (on_lite, on_pg) = (lite_sql.read_all().await, pg_sql.read_all().await);
    for (name, rows_there) in [("SQLite", &on_lite), ("PostgreSQL", &on_pg)] {
        if rows_there.len() != written.len() {
            problems.push(format!(
                "{name} holds {} rows, {} were written",
                rows_there.len(),
                written.len()
            ));
        }
    }
    for row in &written {
        let (Some(l), Some(p)) = (on_lite.get(&row.id), on_pg.get(&row.id)) else {
            problems.push(format!(
                "row {} is missing (SQLite has it: {}, PostgreSQL has it: {})",
                row.origin(),
                on_lite.contains_key(&row.id),
                on_pg.contains_key(&row.id)
            ));
            continue;
        };
        for (c, want) in row.values.iter().enumerate() {
            if l[c] != *want || p[c] != *want {
                problems.push(format!(
                    "row {} column {} ({}): wrote {want:?}; SQLite holds {:?}; PostgreSQL holds {:?}",
                    row.origin(),
                    COLUMNS[c].0,
                    COLUMNS[c].2,
                    l[c],
                    p[c]
                ));
            }
        }
    }

    // `tidemark admin check` compares these: equal rows hash equally on both.
    let mut from = None;
    loop {
        let (l, p) = (
            lite.record_hashes("readings", from, None, 500)
                .await
                .expect("SQLite row hashes"),
            pg.record_hashes("readings", from, None, 500)
                .await
                .expect("PostgreSQL row hashes"),
        );
        for (a, b) in l.records.iter().zip(&p.records) {
            if a.id != b.id {
                problems.push(format!("row hashes of {} and {} side by side", a.id, b.id));
            } else if a.hash != b.hash {
                // Name the columns whose values the hashes saw differently.
                let (x, y) = (
                    lite.get("readings", a.id)
                        .await
                        .expect("get")
                        .unwrap_or_default(),
                    pg.get("readings", a.id)
                        .await
                        .expect("get")
                        .unwrap_or_default(),
                );
                let differ: Vec<String> = x
                    .iter()
                    .filter(|(c, v)| y.get(*c) != Some(*v))
                    .map(|(c, v)| {
                        format!(
                            "{c}: {v} / {}",
                            y.get(c).map_or("absent".into(), ToString::to_string)
                        )
                    })
                    .collect();
                problems.push(format!(
                    "row {} hashes differently on SQLite and PostgreSQL ({})",
                    a.id,
                    differ.join("; ")
                ));
            }
        }
        if l.records.len() != p.records.len() {
            problems.push(format!(
                "SQLite hashed {} rows, PostgreSQL {}",
                l.records.len(),
                p.records.len()
            ));
        }
        match l.records.last() {
            Some(last) if l.truncated => from = Some(Ulid::from(u128::from(last.id) + 1)),
            _ => break,
        }
    }

    let log_lite = logged(&lite, &mut problems).await;
    let log_pg = logged(&pg, &mut problems).await;
    if log_lite.keys().ne(log_pg.keys()) {
        problems.push(format!(
            "the logs differ: SQLite holds {} readings events, PostgreSQL {}",
            log_lite.len(),
            log_pg.len()
        ));
    }
    let mut logged_rows: Vec<Ulid> = log_lite.values().map(|(record, _)| *record).collect();
    logged_rows.sort();
    let mut written_ids: Vec<Ulid> = written.iter().map(|r| r.id).collect();
    written_ids.sort();
    if logged_rows != written_ids {
        problems.push("the log does not hold exactly one event per written row".into());
    }
    for (event, (record, values)) in &log_lite {
        let Some((_, other)) = log_pg.get(event) else {
            continue;
        };
        let (a, b, mut columns) = (values, other, Vec::new());
        for c in a.keys().chain(b.keys()) {
            if a.get(c) != b.get(c) && !columns.contains(c) {
                columns.push(c.clone());
            }
        }
        for c in columns {
            problems.push(format!(
                "event {event} (row {record}) column {c}: SQLite logged {}, PostgreSQL logged {}",
                short_json(a.get(&c)),
                short_json(b.get(&c))
            ));
        }
    }

    assert!(
        problems.is_empty(),
        "TIDEMARK_VALUES_SEED={seed}: {} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
}

/// The same rows, every class's edge values among them, written on a SQLite
/// and a PostgreSQL node at once (each through the write API or by direct SQL,
/// as the sample says, alike on both): the two versions of each row are
/// concurrent and hold the same row, so once exchanged no conflict is
/// recorded on either node, whatever spelling each backend logged a value in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_rows_written_on_both_backends_are_no_conflicts() {
    let (seed, rows) = random_rows();
    let (lite_db, pg_db) = (TestDb::sqlite(), TestDb::postgres());
    let (lite, pg) = (setup(&lite_db).await, setup(&pg_db).await);
    let (lite_sql, pg_sql) = (
        Direct::connect(&lite_db).await,
        Direct::connect(&pg_db).await,
    );
    let mut both = 0;
    for row in &rows {
        let on_lite = write_row(&lite, &lite_sql, row).await;
        let on_pg = write_row(&pg, &pg_sql, row).await;
        both += usize::from(on_lite.is_ok() && on_pg.is_ok());
    }
    assert!(
        both >= rows.len() / 2,
        "TIDEMARK_VALUES_SEED={seed}: only {both} of {} rows were taken on both",
        rows.len()
    );
    let quarantined = exchange(&lite, &pg).await;
    assert!(
        quarantined.is_empty(),
        "TIDEMARK_VALUES_SEED={seed}: {quarantined:?}"
    );
    for store in [&lite, &pg] {
        let conflicts = store
            .list_conflicts(&tidemark_store::ConflictFilter {
                limit: 1_000,
                ..Default::default()
            })
            .await
            .expect("conflicts");
        let shown: Vec<String> = conflicts
            .iter()
            .map(|c| {
                let none = Values::new();
                let (w, l) = (
                    c.winner.values.as_ref().unwrap_or(&none),
                    c.loser.values.as_ref().unwrap_or(&none),
                );
                let differ: Vec<String> = w
                    .keys()
                    .chain(l.keys())
                    .filter(|k| w.get(*k) != l.get(*k))
                    .map(|k| format!("{k}: {} / {}", short_json(w.get(k)), short_json(l.get(k))))
                    .collect();
                format!("row {}: {}", c.record_id, differ.join(", "))
            })
            .collect();
        assert!(
            shown.is_empty(),
            "TIDEMARK_VALUES_SEED={seed}: {} recorded {} conflicts over rows written alike:\n{}",
            store.kind(),
            shown.len(),
            shown.join("\n")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_no_backend_can_store_are_refused_at_the_api() {
    // (table, column, class, value as JSON text, what the reason says)
    let cases = [
        ("readings", "f", "float64", r#""NaN""#, "NaN"),
        ("readings", "t", "text", r#""a\u0000b""#, "NUL"),
        ("prices", "amount", "decimal(10,2)", r#""1.234""#, "scale"),
        ("readings", "s", "int16", "40000", "out of range"),
        ("readings", "dt", "date", r#""2023-02-29""#, "not a date"),
        ("readings", "j", "json", r#"{"k": "a\u0000b"}"#, "\\u0000"),
        (
            "readings",
            "j",
            "json",
            "12345678901234567890123456789012345678901",
            "no 64-bit integer or double holds exactly",
        ),
    ];
    for db in [TestDb::sqlite(), TestDb::postgres()] {
        let store = setup(&db).await;
        let id = Ulid::generate();
        for (table, column, class, value, why) in cases {
            // A valid value next to the refused one: nothing of the write may land.
            let valid = if table == "prices" {
                ("note", r#""fine""#)
            } else {
                ("i", "7")
            };
            let err = store
                .put_raw(table, id, raw_values(&[valid, (column, value)]))
                .await
                .expect_err(&format!(
                    "{}: {table}.{column} = {value} must be refused",
                    db.kind()
                ));
            let message = err.to_string();
            match &err {
                StoreError::InvalidValue {
                    table: t,
                    column: c,
                    class: k,
                    reason,
                } => {
                    assert_eq!(
                        (t.as_str(), c.as_str(), k.as_str()),
                        (table, column, class),
                        "{message}"
                    );
                    assert!(reason.contains(why), "{}: {message}", db.kind());
                }
                other => panic!(
                    "{}: {table}.{column} = {value}: expected InvalidValue, got {other:?}",
                    db.kind()
                ),
            }
            assert!(
                message.contains(&format!("table {table} column {column} ({class})")),
                "{}: {message}",
                db.kind()
            );
        }
        for table in ["readings", "prices"] {
            assert_eq!(
                db.sql(&format!("SELECT COUNT(*) FROM {table}")),
                "0",
                "{} {table}",
                db.kind()
            );
        }
        let events = store
            .events_after(&VersionVector::new(), 1_000)
            .await
            .expect("events");
        assert!(
            events
                .iter()
                .all(|e| e.table_name != "readings" && e.table_name != "prices"),
            "{}: refused writes logged events: {events:?}",
            db.kind()
        );
        assert_eq!(
            store.pending_captures().await.expect("pending"),
            0,
            "{}",
            db.kind()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_writes_no_backend_can_store_are_set_aside_and_the_queue_goes_on() {
    let (lite_db, pg_db) = (TestDb::sqlite(), TestDb::postgres());
    let (lite, pg) = (setup(&lite_db).await, setup(&pg_db).await);

    // SQLite: the capture trigger refuses a value of the wrong storage class.
    for (column, literal, class) in [
        ("f", "'abc'", "float64"),
        ("t", "x'00ff'", "text"),
        ("i", "'abc'", "int64"),
    ] {
        let sql = format!(
            "INSERT INTO readings (id, {column}) VALUES ('{}', {literal})",
            Ulid::generate()
        );
        let err = lite_db.client(&sql).expect_err(&sql);
        let refusal = err
            .find("tidemark: ")
            .map(|at| &err[at..])
            .unwrap_or_default();
        assert!(
            refusal.starts_with(&format!(
                "tidemark: readings.{column} is replicated as {class}"
            )),
            "{sql}: {err}"
        );
    }
    assert_eq!(lite_db.sql("SELECT COUNT(*) FROM readings"), "0");
    assert_eq!(lite.pending_captures().await.expect("pending"), 0);

    // An infinite REAL replicates; a date that does not exist passes the trigger
    // (it is text) and is set aside at drain, and the queue goes on after it.
    let (inf, bad, good, later) = (
        Ulid::generate(),
        Ulid::generate(),
        Ulid::generate(),
        Ulid::generate(),
    );
    lite_db.sql(&format!(
        "INSERT INTO readings (id, f) VALUES ('{inf}', 1e308 * 10)"
    ));
    lite_db.sql(&format!(
        "INSERT INTO readings (id, dt) VALUES ('{bad}', '2023-02-30')"
    ));
    lite_db.sql(&format!(
        "INSERT INTO readings (id, dt) VALUES ('{good}', '2023-02-28')"
    ));
    let drained = lite.drain().await.expect("drain");
    assert_eq!(drained.events, 2, "{drained:?}");
    let [aside] = drained.set_aside.as_slice() else {
        panic!("one capture must be set aside: {drained:?}");
    };
    assert_eq!(aside.record_id, bad.to_string(), "{aside:?}");
    assert!(
        aside.reason.contains("column dt (date)") && aside.reason.contains("2023-02-30"),
        "{aside:?}"
    );
    assert_eq!(lite.count_set_aside().await.expect("count"), 1);
    lite_db.sql(&format!(
        "INSERT INTO readings (id, dt) VALUES ('{later}', '2024-02-29')"
    ));
    let drained = lite.drain().await.expect("drain");
    assert_eq!(
        (drained.events, drained.set_aside.len()),
        (1, 0),
        "{drained:?}"
    );

    // PostgreSQL: NaN written directly is captured, then set aside at drain.
    let nan = Ulid::generate();
    pg_db.sql(&format!(
        "INSERT INTO readings (id, f) VALUES ('{nan}', 1.5)"
    ));
    assert_eq!(pg.drain().await.expect("drain").events, 1);
    pg_db.sql(&format!("UPDATE readings SET f = 'NaN' WHERE id = '{nan}'"));
    let drained = pg.drain().await.expect("drain");
    assert_eq!(drained.events, 0, "{drained:?}");
    let [aside] = drained.set_aside.as_slice() else {
        panic!("the NaN update must be set aside: {drained:?}");
    };
    assert_eq!(
        (aside.record_id.as_str(), aside.operation.as_str()),
        (nan.to_string().as_str(), "UPDATE")
    );
    assert!(
        aside.reason.contains("column f (float64)") && aside.reason.contains("NaN"),
        "{aside:?}"
    );
    assert_eq!(pg.count_set_aside().await.expect("count"), 1);
    pg_db.sql(&format!("UPDATE readings SET f = 2.5 WHERE id = '{nan}'"));
    let drained = pg.drain().await.expect("drain");
    assert_eq!(
        (drained.events, drained.set_aside.len()),
        (1, 0),
        "{drained:?}"
    );

    let quarantined = exchange(&lite, &pg).await;
    assert!(quarantined.is_empty(), "{quarantined:?}");
    let (f, dt) = (col("f"), col("dt"));
    for (name, db) in [("SQLite", &lite_db), ("PostgreSQL", &pg_db)] {
        let rows = Direct::connect(db).await.read_all().await;
        let cell = |id: Ulid, c: usize| rows.get(&id).map(|r| r[c].clone());
        assert_eq!(cell(inf, f), Some(Val::Float(f64::INFINITY)), "{name}");
        assert_eq!(
            cell(good, dt),
            Some(Val::Date(date!(2023 - 02 - 28))),
            "{name}"
        );
        assert_eq!(
            cell(later, dt),
            Some(Val::Date(date!(2024 - 02 - 29))),
            "{name}"
        );
        assert_eq!(cell(nan, f), Some(Val::Float(2.5)), "{name}");
    }
    // The set-aside row stays local to SQLite, as SQLite holds it.
    let rows = Direct::connect(&pg_db).await.read_all().await;
    assert!(
        !rows.contains_key(&bad),
        "the set-aside row reached PostgreSQL"
    );
    assert_eq!(
        lite_db.sql(&format!("SELECT dt FROM readings WHERE id = '{bad}'")),
        "2023-02-30"
    );
}
