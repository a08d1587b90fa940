//! Values between JSON and Postgres' text format, for SQL over HTTP. No I/O: results come
//! in as the text Postgres sends (with the session settings [`super::sql::HTTP_SESSION`]
//! fixes: UTF-8, ISO dates, UTC, hex bytea) and go out as JSON; parameters go the other way.
//!
//! The mapping (also in the README, "SQL over HTTP"):
//!
//! | Postgres | JSON |
//! |---|---|
//! | `int2`, `int4`, `int8`, `oid` | number (an `int8` beyond ±2^53 is exact in the JSON text, but JavaScript's `JSON.parse` rounds it: cast to `text` when that matters) |
//! | `float4`, `float8` | number; `NaN` and `±Infinity` as strings |
//! | `numeric`, `money` | string (exact) |
//! | `bool` | `true` / `false` |
//! | `json`, `jsonb` | the JSON value itself |
//! | `timestamptz` | RFC 3339 string with offset, `2024-05-01T12:00:00.5+00:00` |
//! | `timestamp` | RFC 3339 without offset, `2024-05-01T12:00:00` |
//! | `date`, `time`, `interval`, `uuid`, text types, anything else | string (Postgres' text form) |
//! | `bytea` | base64 string |
//! | arrays of the above | JSON arrays (nested for several dimensions) |
//! | `NULL` | `null` |

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{Number, Value};
use std::borrow::Cow;

pub type Oid = u32;

/// How a type's text form becomes JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bool,
    Int,
    Float,
    /// Kept exact as a string.
    Exact,
    Json,
    Bytea,
    Timestamp,
    TimestampTz,
    Text,
}

const BYTEA: Oid = 17;
const JSON: Oid = 114;
const JSONB: Oid = 3802;

/// Built-in types: oid, name, kind, and the oid of the array type.
const TYPES: &[(Oid, &str, Kind, Oid)] = &[
    (16, "bool", Kind::Bool, 1000),
    (17, "bytea", Kind::Bytea, 1001),
    (18, "char", Kind::Text, 1002),
    (19, "name", Kind::Text, 1003),
    (20, "int8", Kind::Int, 1016),
    (21, "int2", Kind::Int, 1005),
    (23, "int4", Kind::Int, 1007),
    (25, "text", Kind::Text, 1009),
    (26, "oid", Kind::Int, 1028),
    (114, "json", Kind::Json, 199),
    (142, "xml", Kind::Text, 143),
    (650, "cidr", Kind::Text, 651),
    (700, "float4", Kind::Float, 1021),
    (701, "float8", Kind::Float, 1022),
    (790, "money", Kind::Exact, 791),
    (829, "macaddr", Kind::Text, 1040),
    (869, "inet", Kind::Text, 1041),
    (1042, "bpchar", Kind::Text, 1014),
    (1043, "varchar", Kind::Text, 1015),
    (1082, "date", Kind::Text, 1182),
    (1083, "time", Kind::Text, 1183),
    (1114, "timestamp", Kind::Timestamp, 1115),
    (1184, "timestamptz", Kind::TimestampTz, 1185),
    (1186, "interval", Kind::Text, 1187),
    (1266, "timetz", Kind::Text, 1270),
    (1700, "numeric", Kind::Exact, 1231),
    (2950, "uuid", Kind::Text, 2951),
    (3802, "jsonb", Kind::Json, 3807),
    (705, "unknown", Kind::Text, 0),
];

fn scalar(oid: Oid) -> Option<&'static (Oid, &'static str, Kind, Oid)> {
    TYPES.iter().find(|t| t.0 == oid)
}

/// The element type of a built-in array type.
fn element_of(array: Oid) -> Option<&'static (Oid, &'static str, Kind, Oid)> {
    TYPES.iter().find(|t| t.3 == array && array != 0)
}

/// The name a column's type is reported with: `int4`, `text[]`; the oid for other types
/// (enums, composites, ranges and such, whose values come as text).
pub fn type_name(oid: Oid) -> Cow<'static, str> {
    if let Some(t) = scalar(oid) {
        Cow::Borrowed(t.1)
    } else if let Some(t) = element_of(oid) {
        Cow::Owned(format!("{}[]", t.1))
    } else {
        Cow::Owned(oid.to_string())
    }
}

/// A result value (Postgres' text form) as JSON.
pub fn to_json(oid: Oid, text: &str) -> Value {
    if let Some(t) = scalar(oid) {
        return scalar_to_json(t.2, text);
    }
    if let Some(t) = element_of(oid) {
        let kind = t.2;
        if let Some(v) = parse_array(text, &|s| scalar_to_json(kind, s)) {
            return v;
        }
    }
    Value::String(text.to_owned())
}

fn scalar_to_json(kind: Kind, text: &str) -> Value {
    let string = || Value::String(text.to_owned());
    match kind {
        Kind::Bool => Value::Bool(text == "t" || text == "true"),
        Kind::Int => text
            .parse::<i64>()
            .map(|n| Value::Number(n.into()))
            .or_else(|_| text.parse::<u64>().map(|n| Value::Number(n.into())))
            .unwrap_or_else(|_| string()),
        Kind::Float => text
            .parse::<f64>()
            .ok()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(string),
        Kind::Exact | Kind::Text => string(),
        Kind::Json => serde_json::from_str(text).unwrap_or_else(|_| string()),
        Kind::Bytea => match text.strip_prefix("\\x").and_then(hex_decode) {
            Some(bytes) => Value::String(B64.encode(bytes)),
            None => string(),
        },
        Kind::Timestamp => Value::String(rfc3339(text, false)),
        Kind::TimestampTz => Value::String(rfc3339(text, true)),
    }
}

/// `2024-05-01 12:00:00.5+00` (DateStyle ISO) → `2024-05-01T12:00:00.5+00:00`. Values that
/// RFC 3339 cannot express (`infinity`, BC dates, years past 9999, offsets with seconds) keep
/// Postgres' form.
fn rfc3339(text: &str, with_offset: bool) -> String {
    let b = text.as_bytes();
    let looks_iso =
        b.len() >= 19 && b[4] == b'-' && b[10] == b' ' && b[..4].iter().all(u8::is_ascii_digit);
    if !looks_iso || text.ends_with(" BC") {
        return text.to_owned();
    }
    let mut out = String::with_capacity(text.len() + 3);
    out.push_str(&text[..10]);
    out.push('T');
    let rest = &text[11..];
    if !with_offset {
        out.push_str(rest);
        return out;
    }
    // The offset starts at the last sign after the time of day.
    match rest.rfind(['+', '-']) {
        Some(i) => {
            let (time, offset) = rest.split_at(i);
            out.push_str(time);
            match offset.len() {
                3 => {
                    out.push_str(offset);
                    out.push_str(":00");
                }
                6 => out.push_str(offset),
                _ => return text.to_owned(),
            }
        }
        None => return text.to_owned(),
    }
    out
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Parses an array's text form (`{1,2,NULL}`, `{{"a b",c},{d,e}}`, `[0:1]={x,y}`) into
/// nested JSON arrays, each element through `element`. None when it does not parse.
fn parse_array(text: &str, element: &dyn Fn(&str) -> Value) -> Option<Value> {
    // Explicit bounds (`[0:1]={...}`) only say where indexes start.
    let body = match text.strip_prefix('[') {
        Some(_) => &text[text.find('=')? + 1..],
        None => text,
    };
    let mut chars = body.chars().peekable();
    let v = parse_level(&mut chars, element)?;
    chars.next().is_none().then_some(v)
}

fn parse_level(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    element: &dyn Fn(&str) -> Value,
) -> Option<Value> {
    if chars.next()? != '{' {
        return None;
    }
    let mut items = Vec::new();
    if chars.peek() == Some(&'}') {
        chars.next();
        return Some(Value::Array(items));
    }
    loop {
        match chars.peek()? {
            '{' => items.push(parse_level(chars, element)?),
            '"' => {
                chars.next();
                let mut s = String::new();
                loop {
                    match chars.next()? {
                        '\\' => s.push(chars.next()?),
                        '"' => break,
                        c => s.push(c),
                    }
                }
                items.push(element(&s));
            }
            _ => {
                let mut s = String::new();
                while let Some(&c) = chars.peek() {
                    if c == ',' || c == '}' {
                        break;
                    }
                    s.push(c);
                    chars.next();
                }
                items.push(if s.eq_ignore_ascii_case("NULL") {
                    Value::Null
                } else {
                    element(&s)
                });
            }
        }
        match chars.next()? {
            ',' => continue,
            '}' => return Some(Value::Array(items)),
            _ => return None,
        }
    }
}

/// A JSON parameter as Postgres' text form for a parameter of type `oid` (as the server
/// inferred it); None is SQL NULL. Strings go as they are (a `bytea` parameter takes base64,
/// or Postgres' own `\x...` hex); JSON arrays become Postgres arrays unless the parameter is
/// `json`/`jsonb`; objects become JSON text.
pub fn to_param(v: &Value, oid: Oid) -> Option<String> {
    match v {
        Value::Null => None,
        Value::Bool(b) => Some(if *b { "true" } else { "false" }.to_owned()),
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) if oid == BYTEA => Some(bytea_param(s)),
        Value::String(s) => Some(s.clone()),
        Value::Array(items) if oid != JSON && oid != JSONB && scalar(oid).is_none() => {
            let elem = element_of(oid).map_or(0, |t| t.0);
            let mut out = String::new();
            array_literal(items, elem, &mut out);
            Some(out)
        }
        other => Some(other.to_string()),
    }
}

fn bytea_param(s: &str) -> String {
    if s.starts_with("\\x") {
        return s.to_owned();
    }
    match B64.decode(s) {
        Ok(bytes) => {
            let mut out = String::with_capacity(2 + bytes.len() * 2);
            out.push_str("\\x");
            for b in bytes {
                out.push_str(&format!("{b:02x}"));
            }
            out
        }
        Err(_) => s.to_owned(), // Postgres says what is wrong with it
    }
}

fn array_literal(items: &[Value], elem: Oid, out: &mut String) {
    out.push('{');
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match item {
            Value::Array(inner) => array_literal(inner, elem, out),
            Value::Null => out.push_str("NULL"),
            other => {
                let text = to_param(other, elem).unwrap_or_default();
                out.push('"');
                for c in text.chars() {
                    if c == '"' || c == '\\' {
                        out.push('\\');
                    }
                    out.push(c);
                }
                out.push('"');
            }
        }
    }
    out.push('}');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(oid: Oid, text: &str, want: Value) {
        assert_eq!(to_json(oid, text), want, "oid {oid}: {text:?}");
    }

    #[test]
    fn results_become_json() {
        check(23, "42", json!(42));
        check(20, "9007199254740993", json!(9007199254740993i64));
        check(21, "-7", json!(-7));
        check(701, "1.5", json!(1.5));
        check(701, "NaN", json!("NaN"));
        check(700, "-Infinity", json!("-Infinity"));
        check(1700, "12.30", json!("12.30"));
        check(16, "t", json!(true));
        check(16, "f", json!(false));
        check(25, "hé", json!("hé"));
        check(3802, r#"{"a": [1, null]}"#, json!({"a": [1, null]}));
        check(114, "[1,2]", json!([1, 2]));
        check(17, "\\x00ff41", json!("AP9B"));
        check(
            1184,
            "2024-05-01 12:00:00.5+00",
            json!("2024-05-01T12:00:00.5+00:00"),
        );
        check(
            1184,
            "2024-05-01 12:00:00+05:30",
            json!("2024-05-01T12:00:00+05:30"),
        );
        check(1184, "infinity", json!("infinity"));
        check(
            1184,
            "0044-03-15 12:00:00+00 BC",
            json!("0044-03-15 12:00:00+00 BC"),
        );
        check(1114, "2024-05-01 12:00:00", json!("2024-05-01T12:00:00"));
        check(1082, "2024-05-01", json!("2024-05-01"));
        check(
            2950,
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            json!("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"),
        );
        check(99999, "happy", json!("happy"));
    }

    #[test]
    fn arrays_become_nested_json_arrays() {
        check(1007, "{1,2,NULL}", json!([1, 2, null]));
        check(1007, "{{1,2},{3,4}}", json!([[1, 2], [3, 4]]));
        check(
            1009,
            r#"{"a b","x\"y",NULL,"NULL",plain}"#,
            json!(["a b", "x\"y", null, "NULL", "plain"]),
        );
        check(1009, "{}", json!([]));
        check(1007, "[0:1]={5,6}", json!([5, 6]));
        check(1000, "{t,f}", json!([true, false]));
        check(1231, "{1.50,2}", json!(["1.50", "2"]));
        check(3807, r#"{"{\"a\": 1}"}"#, json!([{"a": 1}]));
        check(1001, r#"{"\\x0102"}"#, json!(["AQI="]));
        check(1007, "{1,2", json!("{1,2"));
    }

    #[test]
    fn type_names() {
        assert_eq!(type_name(23), "int4");
        assert_eq!(type_name(1009), "text[]");
        assert_eq!(type_name(16385), "16385");
    }

    #[test]
    fn params_become_text() {
        let p = |v: Value, oid: Oid| to_param(&v, oid);
        assert_eq!(p(json!(null), 23), None);
        assert_eq!(p(json!(41), 23).as_deref(), Some("41"));
        assert_eq!(p(json!(true), 16).as_deref(), Some("true"));
        assert_eq!(p(json!("x'y"), 25).as_deref(), Some("x'y"));
        assert_eq!(p(json!({"a": 1}), 3802).as_deref(), Some(r#"{"a":1}"#));
        assert_eq!(p(json!([1, 2]), 3802).as_deref(), Some("[1,2]"));
        assert_eq!(
            p(json!([1, null, 3]), 1007).as_deref(),
            Some(r#"{"1",NULL,"3"}"#)
        );
        assert_eq!(
            p(json!([["a\"b", "c"]]), 1009).as_deref(),
            Some(r#"{{"a\"b","c"}}"#)
        );
        assert_eq!(p(json!("AP9B"), 17).as_deref(), Some("\\x00ff41"));
        assert_eq!(p(json!("\\x00ff"), 17).as_deref(), Some("\\x00ff"));
        assert_eq!(p(json!(["AQI="]), 1001).as_deref(), Some(r#"{"\\x0102"}"#));
    }
}
