//! A minimal JSON reader for the plugin configuration, exposed as a serde
//! `Deserializer`.
//!
//! Why not `serde_json`: it (with serde's float formatting in error messages) more than
//! doubled the wasm module. The configuration is one flat object of strings, numbers
//! and booleans; this reader parses exactly that (nested values are refused with an
//! error naming the key), and lets `#[derive(Deserialize)]` with
//! `deny_unknown_fields` do the rest. Error messages name the key.

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, Visitor};

/// A deserialization error (message names the key where known).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(pub String);

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

fn kind(u: &de::Unexpected<'_>) -> &'static str {
    match u {
        de::Unexpected::Bool(_) => "a boolean",
        de::Unexpected::Unsigned(_) | de::Unexpected::Signed(_) | de::Unexpected::Float(_) => {
            "a number"
        }
        de::Unexpected::Str(_) | de::Unexpected::Char(_) => "a string",
        de::Unexpected::Unit => "null",
        de::Unexpected::Map => "an object",
        de::Unexpected::Seq => "an array",
        _ => "an unexpected value",
    }
}

fn msg3(a: &str, b: &str, c: &str) -> Error {
    let mut s = String::with_capacity(a.len() + b.len() + c.len());
    s.push_str(a);
    s.push_str(b);
    s.push_str(c);
    Error(s)
}

impl de::Error for Error {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Error(msg.to_string())
    }
    fn invalid_type(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        let mut s = String::from("invalid type: ");
        s.push_str(kind(&unexp));
        s.push_str(", expected ");
        s.push_str(&exp.to_string());
        Error(s)
    }
    fn invalid_value(unexp: de::Unexpected<'_>, exp: &dyn de::Expected) -> Self {
        let mut s = String::from("invalid value: ");
        s.push_str(kind(&unexp));
        s.push_str(", expected ");
        s.push_str(&exp.to_string());
        Error(s)
    }
    fn invalid_length(_len: usize, exp: &dyn de::Expected) -> Self {
        msg3("invalid length, expected ", &exp.to_string(), "")
    }
    fn unknown_variant(variant: &str, expected: &'static [&'static str]) -> Self {
        let mut s = String::from("unknown variant `");
        s.push_str(variant);
        s.push_str("`, expected one of ");
        s.push_str(&expected.join(", "));
        Error(s)
    }
    fn unknown_field(field: &str, expected: &'static [&'static str]) -> Self {
        let mut s = String::from("unknown field `");
        s.push_str(field);
        s.push_str("`, expected one of ");
        s.push_str(&expected.join(", "));
        Error(s)
    }
    fn missing_field(field: &'static str) -> Self {
        msg3("missing field `", field, "`")
    }
    fn duplicate_field(field: &'static str) -> Self {
        msg3("duplicate field `", field, "`")
    }
}

/// A JSON scalar (nested values are only recorded as such).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `null`
    Null,
    /// `true` / `false`
    Bool(bool),
    /// An integer without fraction or exponent.
    UInt(u64),
    /// A negative integer.
    Int(i64),
    /// Any other number.
    Float(f64),
    /// A string.
    Str(String),
    /// An object or array (not supported as a configuration value).
    Nested,
}

struct Reader<'a> {
    b: &'a [u8],
    i: usize,
}

fn at(pos: usize, what: &str) -> Error {
    let mut s = String::from(what);
    s.push_str(" at byte ");
    crate::flags::push_u64(&mut s, pos as u64);
    Error(s)
}

impl<'a> Reader<'a> {
    fn peek(&self) -> Option<u8> {
        self.b.get(self.i).copied()
    }
    fn bump(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }
    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }
    fn expect(&mut self, c: u8, what: &str) -> Result<(), Error> {
        self.ws();
        if self.bump() == Some(c) {
            Ok(())
        } else {
            Err(at(self.i.saturating_sub(1), what))
        }
    }
    fn lit(&mut self, word: &[u8], v: Value) -> Result<Value, Error> {
        if self.b.get(self.i..self.i + word.len()) == Some(word) {
            self.i += word.len();
            Ok(v)
        } else {
            Err(at(self.i, "invalid literal"))
        }
    }
    fn hex4(&mut self) -> Result<u32, Error> {
        let mut v = 0u32;
        for _ in 0..4 {
            let c = self
                .bump()
                .ok_or_else(|| at(self.i, "truncated \\u escape"))?;
            let d = char::from(c)
                .to_digit(16)
                .ok_or_else(|| at(self.i, "bad \\u escape"))?;
            v = v * 16 + d;
        }
        Ok(v)
    }
    fn string(&mut self) -> Result<String, Error> {
        self.expect(b'"', "expected a string")?;
        let mut out: Vec<u8> = Vec::new();
        loop {
            let c = self
                .bump()
                .ok_or_else(|| at(self.i, "unterminated string"))?;
            match c {
                b'"' => break,
                b'\\' => {
                    let e = self
                        .bump()
                        .ok_or_else(|| at(self.i, "unterminated string"))?;
                    let ch = match e {
                        b'"' => '"',
                        b'\\' => '\\',
                        b'/' => '/',
                        b'b' => '\u{8}',
                        b'f' => '\u{c}',
                        b'n' => '\n',
                        b'r' => '\r',
                        b't' => '\t',
                        b'u' => {
                            let hi = self.hex4()?;
                            let cp = if (0xD800..0xDC00).contains(&hi) {
                                if self.bump() != Some(b'\\') || self.bump() != Some(b'u') {
                                    return Err(at(self.i, "lone surrogate"));
                                }
                                let lo = self.hex4()?;
                                if !(0xDC00..0xE000).contains(&lo) {
                                    return Err(at(self.i, "bad surrogate pair"));
                                }
                                0x10000 + ((hi - 0xD800) << 10) + (lo - 0xDC00)
                            } else {
                                hi
                            };
                            char::from_u32(cp).ok_or_else(|| at(self.i, "bad \\u escape"))?
                        }
                        _ => return Err(at(self.i, "bad escape")),
                    };
                    let mut buf = [0u8; 4];
                    out.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                }
                c if c < 0x20 => return Err(at(self.i, "control character in string")),
                c => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|_| at(self.i, "invalid UTF-8 in string"))
    }
    fn number(&mut self) -> Result<Value, Error> {
        let start = self.i;
        let neg = self.peek() == Some(b'-');
        if neg {
            self.i += 1;
        }
        let mut mant: u64 = 0;
        let mut exp: i32 = 0;
        let mut digits = 0;
        let mut integral = true;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            self.i += 1;
            digits += 1;
            if mant < 1_000_000_000_000_000_000 {
                mant = mant * 10 + u64::from(c - b'0');
            } else {
                exp = exp.saturating_add(1);
                integral = false;
            }
        }
        if digits == 0 {
            return Err(at(start, "invalid number"));
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            integral = false;
            let mut frac = 0;
            while let Some(c @ b'0'..=b'9') = self.peek() {
                self.i += 1;
                frac += 1;
                if mant < 1_000_000_000_000_000_000 {
                    mant = mant * 10 + u64::from(c - b'0');
                    exp = exp.saturating_sub(1);
                }
            }
            if frac == 0 {
                return Err(at(start, "invalid number"));
            }
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            self.i += 1;
            integral = false;
            let eneg = match self.peek() {
                Some(b'-') => {
                    self.i += 1;
                    true
                }
                Some(b'+') => {
                    self.i += 1;
                    false
                }
                _ => false,
            };
            let mut e: i32 = 0;
            let mut n = 0;
            while let Some(c @ b'0'..=b'9') = self.peek() {
                self.i += 1;
                n += 1;
                e = e.saturating_mul(10).saturating_add(i32::from(c - b'0'));
            }
            if n == 0 {
                return Err(at(start, "invalid number"));
            }
            exp = exp.saturating_add(if eneg { -e } else { e });
        }
        if integral {
            if !neg {
                return Ok(Value::UInt(mant));
            }
            if let Ok(v) = i64::try_from(mant) {
                return Ok(Value::Int(-v));
            }
        }
        let mut v = mant as f64;
        if (-22..0).contains(&exp) {
            // Powers of ten up to 1e22 are exact: one correctly rounded division.
            v /= 10f64.powi(-exp);
        } else if exp != 0 {
            v *= 10f64.powi(exp);
        }
        Ok(Value::Float(if neg { -v } else { v }))
    }
    fn skip_nested(&mut self) -> Result<(), Error> {
        let mut depth = 0usize;
        loop {
            self.ws();
            match self.peek() {
                Some(b'{' | b'[') => {
                    depth += 1;
                    self.i += 1;
                }
                Some(b'}' | b']') => {
                    depth = depth.saturating_sub(1);
                    self.i += 1;
                    if depth == 0 {
                        return Ok(());
                    }
                }
                Some(b'"') => {
                    self.string()?;
                }
                Some(_) => {
                    self.i += 1;
                }
                None => return Err(at(self.i, "unterminated value")),
            }
        }
    }
    fn value(&mut self) -> Result<Value, Error> {
        self.ws();
        match self.peek() {
            Some(b'"') => Ok(Value::Str(self.string()?)),
            Some(b't') => self.lit(b"true", Value::Bool(true)),
            Some(b'f') => self.lit(b"false", Value::Bool(false)),
            Some(b'n') => self.lit(b"null", Value::Null),
            Some(b'{' | b'[') => {
                self.skip_nested()?;
                Ok(Value::Nested)
            }
            Some(b'-' | b'0'..=b'9') => self.number(),
            _ => Err(at(self.i, "expected a value")),
        }
    }
}

/// Parses a flat JSON object into its (key, value) pairs, in order.
pub fn parse_object(bytes: &[u8]) -> Result<Vec<(String, Value)>, Error> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut r = Reader { b: bytes, i: 0 };
    let mut out = Vec::new();
    r.ws();
    if r.peek().is_none() {
        return Err(Error("empty configuration: expected a JSON object".into()));
    }
    r.expect(b'{', "expected a JSON object")?;
    r.ws();
    if r.peek() == Some(b'}') {
        r.i += 1;
    } else {
        loop {
            let k = r.string()?;
            r.expect(b':', "expected ':'")?;
            let v = r.value()?;
            out.push((k, v));
            r.ws();
            match r.bump() {
                Some(b',') => {
                    r.ws();
                    continue;
                }
                Some(b'}') => break,
                _ => return Err(at(r.i.saturating_sub(1), "expected ',' or '}'")),
            }
        }
    }
    r.ws();
    if r.peek().is_some() {
        return Err(at(r.i, "trailing characters after the JSON object"));
    }
    Ok(out)
}

/// Deserializes `T` from a flat JSON object.
pub fn from_slice<T: de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    let pairs = parse_object(bytes)?;
    T::deserialize(ObjectDe {
        pairs: pairs.into_iter(),
        key: None,
        value: None,
    })
}

struct ObjectDe {
    pairs: std::vec::IntoIter<(String, Value)>,
    key: Option<String>,
    value: Option<Value>,
}

impl<'de> de::Deserializer<'de> for ObjectDe {
    type Error = Error;
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_map(self)
    }
    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct newtype_struct seq tuple
        tuple_struct map struct enum identifier ignored_any
    }
}

impl<'de> MapAccess<'de> for ObjectDe {
    type Error = Error;
    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        match self.pairs.next() {
            Some((k, v)) => {
                self.value = Some(v);
                let r = seed.deserialize(k.clone().into_deserializer());
                self.key = Some(k);
                r.map(Some)
            }
            None => Ok(None),
        }
    }
    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Error> {
        let v = self.value.take().unwrap_or(Value::Null);
        seed.deserialize(ValueDe(v)).map_err(|e| {
            let mut s = String::from("field `");
            s.push_str(self.key.as_deref().unwrap_or("?"));
            s.push_str("`: ");
            s.push_str(&e.0);
            Error(s)
        })
    }
}

struct ValueDe(Value);

impl<'de> de::Deserializer<'de> for ValueDe {
    type Error = Error;
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(b),
            Value::UInt(u) => visitor.visit_u64(u),
            Value::Int(i) => visitor.visit_i64(i),
            Value::Float(f) => visitor.visit_f64(f),
            Value::Str(s) => visitor.visit_string(s),
            Value::Nested => Err(Error("nested objects and arrays are not supported".into())),
        }
    }
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.0 {
            Value::Null => visitor.visit_none(),
            other => visitor.visit_some(ValueDe(other)),
        }
    }
    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        match self.0 {
            Value::Str(s) => visitor.visit_enum(s.into_deserializer()),
            _ => Err(Error("expected a string".into())),
        }
    }
    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct newtype_struct seq tuple
        tuple_struct map struct identifier ignored_any
    }
}
