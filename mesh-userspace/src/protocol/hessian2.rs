//! The Hessian2 subset a Dubbo 2 request body and a SOFA Bolt `SofaRequest` need: read strings
//! and ints, class definitions, object and map starts, skip any value (so arguments can be
//! stepped over without being understood), and write strings.
//!
//! Two grammars ([`Dialect`]): Hessian 2.0 as published, and the earlier 2.0 draft that
//! Hessian 3.1 wrote and that the npm `hessian.js-1` encoder (`sofa-hessian-node`'s default,
//! used by `sofa-bolt-node`) still writes.
//!
//! The reader works on a borrowed slice, never allocates in proportion to a length it read
//! from the input, bounds nesting by [`MAX_DEPTH`], and reports every malformation as a
//! [`Hessian2Error`]: it does not panic on any input.
//!
//! String lengths in Hessian2 count UTF-16 code units. A 4-byte UTF-8 sequence counts as two
//! (a surrogate pair), a 3-byte sequence as one (which also covers the CESU-8 surrogate halves
//! Java writes); strings are returned with invalid sequences replaced (lossy).

use std::borrow::Cow;

use thiserror::Error;

/// Deepest nesting of lists, maps and objects the reader follows.
pub const MAX_DEPTH: usize = 64;
/// Longest final string chunk written in the one-byte form (`0x00..=0x1f`).
const STRING_DIRECT_MAX: usize = 0x1f;
/// Longest final string chunk written in the two-byte form (`0x30..=0x33`).
const STRING_SHORT_MAX: usize = 0x3ff;
/// Length of a non-final string chunk the writer emits (`R`).
const STRING_CHUNK: usize = 0x8000;

/// Wire tags (Hessian 2.0 serialization grammar).
pub mod tag {
    pub const BINARY_CHUNK: u8 = b'A';
    pub const BINARY_FINAL: u8 = b'B';
    pub const CLASS_DEF: u8 = b'C';
    pub const DOUBLE: u8 = b'D';
    pub const FALSE: u8 = b'F';
    pub const UNTYPED_MAP: u8 = b'H';
    pub const INT: u8 = b'I';
    pub const DATE_MILLIS: u8 = b'J';
    pub const DATE_MINUTES: u8 = b'K';
    pub const LONG: u8 = b'L';
    pub const TYPED_MAP: u8 = b'M';
    pub const NULL: u8 = b'N';
    pub const OBJECT: u8 = b'O';
    pub const REF: u8 = b'Q';
    pub const STRING_CHUNK: u8 = b'R';
    pub const STRING_FINAL: u8 = b'S';
    pub const TRUE: u8 = b'T';
    pub const TYPED_LIST: u8 = b'U';
    pub const TYPED_FIXED_LIST: u8 = b'V';
    pub const UNTYPED_LIST: u8 = b'W';
    pub const UNTYPED_FIXED_LIST: u8 = b'X';
    pub const LONG_INT: u8 = b'Y';
    pub const END: u8 = b'Z';
    pub const DOUBLE_ZERO: u8 = 0x5b;
    pub const DOUBLE_ONE: u8 = 0x5c;
    pub const DOUBLE_BYTE: u8 = 0x5d;
    pub const DOUBLE_SHORT: u8 = 0x5e;
    pub const DOUBLE_MILLS: u8 = 0x5f;
}

/// Wire tags of the 2.0 draft ([`Dialect::Draft`]) where they differ from 2.0.
pub mod draft_tag {
    pub const BINARY_CHUNK: u8 = b'b';
    pub const DATE: u8 = b'd';
    pub const DOUBLE_ZERO: u8 = b'g';
    pub const DOUBLE_ONE: u8 = b'h';
    pub const DOUBLE_BYTE: u8 = b'i';
    pub const DOUBLE_SHORT: u8 = b'j';
    pub const DOUBLE_FLOAT: u8 = b'k';
    pub const LIST_LONG_LEN: u8 = b'l';
    pub const LIST_SHORT_LEN: u8 = b'n';
    /// Class definition: `O` int(name length) name fields(int) field-name strings.
    pub const CLASS_DEF: u8 = b'O';
    /// Instance: `o` int(class index) field values.
    pub const OBJECT: u8 = b'o';
    pub const REF_BYTE: u8 = b'J';
    pub const REF_SHORT: u8 = b'K';
    pub const REF: u8 = b'R';
    pub const STRING_CHUNK: u8 = b's';
    pub const TYPE_NAME: u8 = b't';
    pub const TYPE_REF: u8 = b'u';
    pub const LIST: u8 = b'V';
    pub const LIST_TYPE_REF: u8 = b'v';
    pub const LONG_INT: u8 = b'w';
    pub const END: u8 = b'z';
}

/// Which Hessian 2 grammar a stream is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// Hessian 2.0 as published (Java hessian 4, hessian-lite, sofa-hessian): class
    /// definitions `C`, instances `O`/`0x60..=0x6f`, maps `H`/`M` ending in `Z`, string chunks `R`.
    V2,
    /// The 2.0 draft: class definitions `O`, instances `o`, maps `M [type]` ending in `z`, lists
    /// `V [type] n|l len` ending in `z` or `v type-ref len`, string chunks `s`, references
    /// `R`/`J`/`K`, longs `w`, doubles `g h i j k`, dates `d`, binary chunks `b`.
    Draft,
}

/// Malformed Hessian2 input.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Hessian2Error {
    #[error("hessian2 input ends at byte {at}")]
    Truncated { at: usize },
    #[error("unexpected hessian2 tag 0x{tag:02x} at byte {at}, expected {expected}")]
    UnexpectedTag {
        tag: u8,
        at: usize,
        expected: &'static str,
    },
    #[error("invalid utf-8 in a hessian2 string at byte {at}")]
    InvalidUtf8 { at: usize },
    #[error("negative hessian2 length {len} at byte {at}")]
    NegativeLength { len: i32, at: usize },
    #[error("hessian2 values nested deeper than {max}")]
    TooDeep { max: usize },
    #[error("hessian2 class reference {index} at byte {at}, but {defined} classes are defined")]
    BadClassRef { index: i32, defined: usize, at: usize },
    #[error("hessian2 type reference {index} at byte {at}, but {defined} types are defined")]
    BadTypeRef { index: i32, defined: usize, at: usize },
    #[error("hessian2 list without its `z` end at byte {at}")]
    MissingEnd { at: usize },
    #[error("invalid java type descriptor {descriptor:?}")]
    BadDescriptor { descriptor: String },
}

impl Hessian2Error {
    /// A short, stable label for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Truncated { .. } => "hessian2_truncated",
            Self::UnexpectedTag { .. } => "hessian2_unexpected_tag",
            Self::InvalidUtf8 { .. } => "hessian2_invalid_utf8",
            Self::NegativeLength { .. } => "hessian2_negative_length",
            Self::TooDeep { .. } => "hessian2_too_deep",
            Self::BadClassRef { .. } => "hessian2_bad_class_ref",
            Self::BadTypeRef { .. } => "hessian2_bad_type_ref",
            Self::MissingEnd { .. } => "hessian2_missing_end",
            Self::BadDescriptor { .. } => "hessian2_bad_descriptor",
        }
    }
}

pub type Result<T> = std::result::Result<T, Hessian2Error>;

/// Whether `tag` starts a string (any chunk form).
pub fn is_string_tag(tag: u8) -> bool {
    matches!(tag, 0x00..=0x1f | 0x30..=0x33 | tag::STRING_CHUNK | tag::STRING_FINAL)
}

/// A class definition read by [`Reader::read_class_def`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassDef<'a> {
    /// The class name; `None` when it is longer than the limit the caller gave.
    pub name: Option<Cow<'a, str>>,
    /// The index instances use to refer to it.
    pub index: usize,
    pub fields: usize,
}

/// A cursor over one Hessian2 stream (a Dubbo body, a Bolt content): class definitions and
/// types seen so far are remembered, since later values refer to them by index.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    dialect: Dialect,
    /// Field count of each class definition, in definition order.
    class_fields: Vec<usize>,
    /// Number of type names defined so far (type references index them).
    types: usize,
    depth: usize,
}

impl<'a> Reader<'a> {
    /// A reader of Hessian 2.0 ([`Dialect::V2`]).
    pub fn new(buf: &'a [u8]) -> Self {
        Self::with_dialect(buf, Dialect::V2)
    }

    pub fn with_dialect(buf: &'a [u8], dialect: Dialect) -> Self {
        Self {
            buf,
            pos: 0,
            dialect,
            class_fields: Vec::new(),
            types: 0,
            depth: 0,
        }
    }

    /// Offset of the next unread byte.
    pub fn position(&self) -> usize {
        self.pos
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Whether everything has been read.
    pub fn is_at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// The next tag, without consuming it.
    pub fn peek(&self) -> Result<u8> {
        self.buf
            .get(self.pos)
            .copied()
            .ok_or(Hessian2Error::Truncated { at: self.pos })
    }

    fn byte(&mut self) -> Result<u8> {
        let b = self.peek()?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&end| end <= self.buf.len());
        let end = end.ok_or(Hessian2Error::Truncated { at: self.buf.len() })?;
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn u16(&mut self) -> Result<usize> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn unexpected(&self, tag: u8, at: usize, expected: &'static str) -> Hessian2Error {
        Hessian2Error::UnexpectedTag { tag, at, expected }
    }

    /// Read an `int` in any of its encodings.
    pub fn read_int(&mut self) -> Result<i32> {
        let at = self.pos;
        let t = self.byte()?;
        match t {
            0x80..=0xbf => Ok(i32::from(t) - 0x90),
            0xc0..=0xcf => Ok(((i32::from(t) - 0xc8) << 8) | i32::from(self.byte()?)),
            0xd0..=0xd7 => {
                let b = self.take(2)?;
                Ok(((i32::from(t) - 0xd4) << 16) | (i32::from(b[0]) << 8) | i32::from(b[1]))
            }
            tag::INT => {
                let b = self.take(4)?;
                Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            }
            _ => Err(self.unexpected(t, at, "an int")),
        }
    }

    /// Read a non-negative length or count encoded as an `int`.
    fn read_len(&mut self) -> Result<usize> {
        let at = self.pos;
        let len = self.read_int()?;
        usize::try_from(len).map_err(|_| Hessian2Error::NegativeLength { len, at })
    }

    /// Read a string (all chunks).
    pub fn read_string(&mut self) -> Result<String> {
        let mut bytes = Vec::new();
        self.string_chunks(Some(&mut bytes))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Read a string, or `None` for a null.
    pub fn read_nullable_string(&mut self) -> Result<Option<String>> {
        if self.peek()? == tag::NULL {
            self.pos += 1;
            return Ok(None);
        }
        self.read_string().map(Some)
    }

    /// Whether `t` starts a string in this reader's dialect.
    pub fn is_string_start(&self, t: u8) -> bool {
        match self.dialect {
            Dialect::V2 => is_string_tag(t),
            Dialect::Draft => matches!(t, 0x00..=0x1f | draft_tag::STRING_CHUNK | tag::STRING_FINAL),
        }
    }

    /// Whether a string comes next.
    pub fn at_string(&self) -> Result<bool> {
        Ok(self.is_string_start(self.peek()?))
    }

    /// Consume a null if it is next; `false` (consuming nothing) otherwise.
    pub fn read_null(&mut self) -> Result<bool> {
        let null = self.peek()? == tag::NULL;
        if null {
            self.pos += 1;
        }
        Ok(null)
    }

    /// Read the chunks of a string, appending their UTF-8 bytes to `out` when given.
    fn string_chunks(&mut self, mut out: Option<&mut Vec<u8>>) -> Result<()> {
        self.string_spans(|span| {
            if let Some(out) = out.as_deref_mut() {
                out.extend_from_slice(span);
            }
        })
    }

    /// Read the chunks of a string, handing each chunk's UTF-8 bytes to `span`.
    fn string_spans(&mut self, mut span: impl FnMut(&'a [u8])) -> Result<()> {
        let chunk_tag = match self.dialect {
            Dialect::V2 => tag::STRING_CHUNK,
            Dialect::Draft => draft_tag::STRING_CHUNK,
        };
        loop {
            let at = self.pos;
            let t = self.byte()?;
            let (units, last) = match t {
                0x00..=0x1f => (usize::from(t), true),
                0x30..=0x33 if self.dialect == Dialect::V2 => {
                    ((usize::from(t - 0x30) << 8) | usize::from(self.byte()?), true)
                }
                t if t == chunk_tag => (self.u16()?, false),
                tag::STRING_FINAL => (self.u16()?, true),
                _ => return Err(self.unexpected(t, at, "a string")),
            };
            let start = self.pos;
            self.skip_utf16_units(units)?;
            span(&self.buf[start..self.pos]);
            if last {
                return Ok(());
            }
        }
    }

    /// Read a string of at most `max` UTF-8 bytes without copying it when it is one chunk of
    /// valid UTF-8; `None` (the string consumed, nothing allocated) when it is longer.
    pub fn read_str_max(&mut self, max: usize) -> Result<Option<Cow<'a, str>>> {
        let start = self.pos;
        let (mut len, mut chunks, mut first): (usize, usize, &'a [u8]) = (0, 0, &[]);
        self.string_spans(|span| {
            len += span.len();
            chunks += 1;
            if chunks == 1 {
                first = span;
            }
        })?;
        if len > max {
            return Ok(None);
        }
        if chunks == 1 {
            return Ok(Some(String::from_utf8_lossy(first)));
        }
        let end = self.pos;
        self.pos = start;
        let mut bytes = Vec::with_capacity(len);
        self.string_chunks(Some(&mut bytes))?;
        debug_assert_eq!(self.pos, end);
        Ok(Some(match String::from_utf8(bytes) {
            Ok(s) => Cow::Owned(s),
            Err(e) => Cow::Owned(String::from_utf8_lossy(e.as_bytes()).into_owned()),
        }))
    }

    /// Read a class definition (`C` name fields names in 2.0; `O` name-length name fields names
    /// in the draft) and remember it. `field(i, name)` sees each field name, `None` when it is
    /// longer than `max_name` bytes, as is the class name then.
    pub fn read_class_def(
        &mut self,
        max_name: usize,
        mut field: impl FnMut(usize, Option<&str>),
    ) -> Result<ClassDef<'a>> {
        let at = self.pos;
        let t = self.byte()?;
        let name = match (self.dialect, t) {
            (Dialect::V2, tag::CLASS_DEF) => self.read_str_max(max_name)?,
            (Dialect::Draft, draft_tag::CLASS_DEF) => {
                let units = self.read_len()?;
                let start = self.pos;
                self.skip_utf16_units(units)?;
                let raw = &self.buf[start..self.pos];
                (raw.len() <= max_name).then(|| String::from_utf8_lossy(raw))
            }
            _ => return Err(self.unexpected(t, at, "a class definition")),
        };
        let fields = self.read_len()?;
        for i in 0..fields {
            let name = self.read_str_max(max_name)?;
            field(i, name.as_deref());
        }
        self.class_fields.push(fields);
        Ok(ClassDef {
            name,
            index: self.class_fields.len() - 1,
            fields,
        })
    }

    /// Whether a class definition comes next.
    pub fn at_class_def(&self) -> Result<bool> {
        let t = self.peek()?;
        Ok(match self.dialect {
            Dialect::V2 => t == tag::CLASS_DEF,
            Dialect::Draft => t == draft_tag::CLASS_DEF,
        })
    }

    /// Read the start of an object instance (`O` index or `0x60..=0x6f` in 2.0, `o` index in
    /// the draft): the index of its class, which is defined. Its field values follow.
    pub fn read_instance_start(&mut self) -> Result<usize> {
        let at = self.pos;
        let t = self.byte()?;
        let index = match (self.dialect, t) {
            (Dialect::V2, tag::OBJECT) | (Dialect::Draft, draft_tag::OBJECT) => self.read_int()?,
            (Dialect::V2, 0x60..=0x6f) => i32::from(t - 0x60),
            _ => return Err(self.unexpected(t, at, "an object")),
        };
        match usize::try_from(index) {
            Ok(i) if i < self.class_fields.len() => Ok(i),
            _ => Err(Hessian2Error::BadClassRef {
                index,
                defined: self.class_fields.len(),
                at,
            }),
        }
    }

    /// Step over `units` UTF-16 code units of UTF-8 (or CESU-8) text.
    fn skip_utf16_units(&mut self, units: usize) -> Result<()> {
        let mut left = units;
        while left > 0 {
            let at = self.pos;
            let lead = self.byte()?;
            let (extra, count) = match lead {
                0x00..=0x7f => (0, 1),
                0xc0..=0xdf => (1, 1),
                0xe0..=0xef => (2, 1),
                0xf0..=0xf7 => (3, 2),
                _ => return Err(Hessian2Error::InvalidUtf8 { at }),
            };
            for _ in 0..extra {
                if self.byte()? & 0xc0 != 0x80 {
                    return Err(Hessian2Error::InvalidUtf8 { at });
                }
            }
            left = left.saturating_sub(count);
        }
        Ok(())
    }

    /// Step over a type: a type name (which defines a new type) or a reference to one.
    fn skip_type(&mut self) -> Result<()> {
        if is_string_tag(self.peek()?) {
            self.string_chunks(None)?;
            self.types += 1;
            return Ok(());
        }
        let at = self.pos;
        let index = self.read_int()?;
        match usize::try_from(index) {
            Ok(i) if i < self.types => Ok(()),
            _ => Err(Hessian2Error::BadTypeRef {
                index,
                defined: self.types,
                at,
            }),
        }
    }

    /// Step over one complete value of any kind, including a class definition before it.
    pub fn skip_value(&mut self) -> Result<()> {
        if self.depth >= MAX_DEPTH {
            return Err(Hessian2Error::TooDeep { max: MAX_DEPTH });
        }
        self.depth += 1;
        let result = match self.dialect {
            Dialect::V2 => self.skip_value_inner(),
            Dialect::Draft => self.skip_draft_value(),
        };
        self.depth -= 1;
        result
    }

    /// Step over a draft type, when one is there: a name (`t`, defining a type) or a reference
    /// (`u`).
    fn skip_draft_type(&mut self) -> Result<()> {
        match self.peek()? {
            draft_tag::TYPE_NAME => {
                self.pos += 1;
                let units = self.u16()?;
                self.skip_utf16_units(units)?;
                self.types += 1;
                Ok(())
            }
            draft_tag::TYPE_REF => {
                self.pos += 1;
                self.type_ref()
            }
            _ => Ok(()),
        }
    }

    /// Read a type reference: an int below the number of types defined.
    fn type_ref(&mut self) -> Result<()> {
        let at = self.pos;
        let index = self.read_int()?;
        match usize::try_from(index) {
            Ok(i) if i < self.types => Ok(()),
            _ => Err(Hessian2Error::BadTypeRef {
                index,
                defined: self.types,
                at,
            }),
        }
    }

    fn skip_draft_value(&mut self) -> Result<()> {
        // Class definitions precede the value that uses them (a loop: see skip_value_inner).
        while self.at_class_def()? {
            self.read_class_def(0, |_, _| {})?;
        }
        let at = self.pos;
        let t = self.peek()?;
        if self.is_string_start(t) {
            return self.string_chunks(None);
        }
        self.pos += 1;
        match t {
            // Binary: direct, chunked.
            0x20..=0x2f => self.take(usize::from(t - 0x20)).map(drop),
            draft_tag::BINARY_CHUNK | tag::BINARY_FINAL => {
                let mut last = t == tag::BINARY_FINAL;
                loop {
                    let len = self.u16()?;
                    self.take(len)?;
                    if last {
                        return Ok(());
                    }
                    let at = self.pos;
                    match self.byte()? {
                        draft_tag::BINARY_CHUNK => {}
                        tag::BINARY_FINAL => last = true,
                        t @ 0x20..=0x2f => return self.take(usize::from(t - 0x20)).map(drop),
                        t => return Err(self.unexpected(t, at, "a binary chunk")),
                    }
                }
            }
            tag::NULL | tag::TRUE | tag::FALSE | draft_tag::DOUBLE_ZERO | draft_tag::DOUBLE_ONE => Ok(()),
            // Ints, longs, doubles, dates, references.
            0x80..=0xbf | 0xd8..=0xef => Ok(()),
            0xc0..=0xcf | 0xf0..=0xff | draft_tag::DOUBLE_BYTE | draft_tag::REF_BYTE => {
                self.take(1).map(drop)
            }
            0xd0..=0xd7 | 0x38..=0x3f | draft_tag::DOUBLE_SHORT | draft_tag::REF_SHORT => {
                self.take(2).map(drop)
            }
            tag::INT | draft_tag::LONG_INT | draft_tag::DOUBLE_FLOAT | draft_tag::REF => {
                self.take(4).map(drop)
            }
            tag::LONG | tag::DOUBLE | draft_tag::DATE => self.take(8).map(drop),
            draft_tag::OBJECT => {
                let at = self.pos;
                let index = self.read_int()?;
                self.skip_object(index, at)
            }
            tag::TYPED_MAP => {
                self.skip_draft_type()?;
                self.skip_until_end(2)
            }
            tag::UNTYPED_MAP => self.skip_until_end(2),
            draft_tag::LIST => {
                self.skip_draft_type()?;
                let len = match self.peek()? {
                    draft_tag::LIST_SHORT_LEN => {
                        self.pos += 1;
                        Some(usize::from(self.byte()?))
                    }
                    draft_tag::LIST_LONG_LEN => {
                        self.pos += 1;
                        let b = self.take(4)?;
                        let len = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                        let at = self.pos - 4;
                        Some(usize::try_from(len).map_err(|_| Hessian2Error::NegativeLength { len, at })?)
                    }
                    _ => None,
                };
                match len {
                    None => self.skip_until_end(1),
                    Some(len) => {
                        self.skip_values(len)?;
                        let at = self.pos;
                        if self.read_end()? {
                            Ok(())
                        } else {
                            Err(Hessian2Error::MissingEnd { at })
                        }
                    }
                }
            }
            draft_tag::LIST_TYPE_REF => {
                self.type_ref()?;
                let len = self.read_len()?;
                self.skip_values(len)
            }
            _ => Err(self.unexpected(t, at, "a value")),
        }
    }

    fn skip_value_inner(&mut self) -> Result<()> {
        // Class definitions precede the value that uses them (a loop, not recursion: a run of
        // definitions must not grow the stack).
        while self.peek()? == tag::CLASS_DEF {
            self.pos += 1;
            self.string_chunks(None)?;
            let fields = self.read_len()?;
            for _ in 0..fields {
                self.string_chunks(None)?;
            }
            self.class_fields.push(fields);
        }
        let at = self.pos;
        let t = self.peek()?;
        if is_string_tag(t) {
            return self.string_chunks(None);
        }
        self.pos += 1;
        match t {
            // Binary: direct, short, chunked.
            0x20..=0x2f => self.take(usize::from(t - 0x20)).map(drop),
            0x34..=0x37 => {
                let len = (usize::from(t - 0x34) << 8) | usize::from(self.byte()?);
                self.take(len).map(drop)
            }
            tag::BINARY_CHUNK | tag::BINARY_FINAL => {
                let mut last = t == tag::BINARY_FINAL;
                loop {
                    let len = self.u16()?;
                    self.take(len)?;
                    if last {
                        return Ok(());
                    }
                    let at = self.pos;
                    match self.byte()? {
                        tag::BINARY_CHUNK => {}
                        tag::BINARY_FINAL => last = true,
                        t @ 0x20..=0x2f => return self.take(usize::from(t - 0x20)).map(drop),
                        t @ 0x34..=0x37 => {
                            let len = (usize::from(t - 0x34) << 8) | usize::from(self.byte()?);
                            return self.take(len).map(drop);
                        }
                        t => return Err(self.unexpected(t, at, "a binary chunk")),
                    }
                }
            }
            // Scalars of fixed size.
            tag::NULL | tag::TRUE | tag::FALSE | tag::DOUBLE_ZERO | tag::DOUBLE_ONE => Ok(()),
            0x80..=0xbf | 0xd8..=0xef => Ok(()),
            0xc0..=0xcf | 0xf0..=0xff | tag::DOUBLE_BYTE => self.take(1).map(drop),
            0xd0..=0xd7 | 0x38..=0x3f | tag::DOUBLE_SHORT => self.take(2).map(drop),
            tag::INT | tag::LONG_INT | tag::DATE_MINUTES | tag::DOUBLE_MILLS => self.take(4).map(drop),
            tag::LONG | tag::DOUBLE | tag::DATE_MILLIS => self.take(8).map(drop),
            tag::REF => self.read_int().map(drop),
            tag::OBJECT => {
                let at = self.pos;
                let index = self.read_int()?;
                self.skip_object(index, at)
            }
            0x60..=0x6f => self.skip_object(i32::from(t - 0x60), at),
            tag::UNTYPED_MAP => self.skip_until_end(2),
            tag::TYPED_MAP => {
                self.skip_type()?;
                self.skip_until_end(2)
            }
            tag::TYPED_LIST => {
                self.skip_type()?;
                self.skip_until_end(1)
            }
            tag::UNTYPED_LIST => self.skip_until_end(1),
            tag::TYPED_FIXED_LIST => {
                self.skip_type()?;
                let len = self.read_len()?;
                self.skip_values(len)
            }
            tag::UNTYPED_FIXED_LIST => {
                let len = self.read_len()?;
                self.skip_values(len)
            }
            0x70..=0x77 => {
                self.skip_type()?;
                self.skip_values(usize::from(t - 0x70))
            }
            0x78..=0x7f => self.skip_values(usize::from(t - 0x78)),
            _ => Err(self.unexpected(t, at, "a value")),
        }
    }

    fn skip_object(&mut self, index: i32, at: usize) -> Result<()> {
        let fields = usize::try_from(index)
            .ok()
            .and_then(|i| self.class_fields.get(i).copied());
        let fields = fields.ok_or(Hessian2Error::BadClassRef {
            index,
            defined: self.class_fields.len(),
            at,
        })?;
        self.skip_values(fields)
    }

    /// Read the start of a map: `H`, or `M` and its type (optional in the draft).
    pub fn read_map_start(&mut self) -> Result<()> {
        let at = self.pos;
        match (self.dialect, self.byte()?) {
            (_, tag::UNTYPED_MAP) => Ok(()),
            (Dialect::V2, tag::TYPED_MAP) => self.skip_type(),
            (Dialect::Draft, tag::TYPED_MAP) => self.skip_draft_type(),
            (_, t) => Err(self.unexpected(t, at, "a map")),
        }
    }

    /// Whether a map comes next.
    pub fn at_map(&self) -> Result<bool> {
        Ok(matches!(self.peek()?, tag::UNTYPED_MAP | tag::TYPED_MAP))
    }

    /// The end marker of maps and lists: `Z`, or `z` in the draft.
    fn end_tag(&self) -> u8 {
        match self.dialect {
            Dialect::V2 => tag::END,
            Dialect::Draft => draft_tag::END,
        }
    }

    /// Consume the end marker (`Z`; `z` in the draft) if it is next; `false` (consuming
    /// nothing) otherwise.
    pub fn read_end(&mut self) -> Result<bool> {
        let end = self.peek()? == self.end_tag();
        if end {
            self.pos += 1;
        }
        Ok(end)
    }

    /// Skip `n` values. Every value takes at least one byte, so a huge `n` fails on the input's
    /// end rather than looping long.
    fn skip_values(&mut self, n: usize) -> Result<()> {
        for _ in 0..n {
            self.skip_value()?;
        }
        Ok(())
    }

    /// Skip values in groups of `group` (1 for lists, 2 for maps) until the `Z` end marker.
    fn skip_until_end(&mut self, group: usize) -> Result<()> {
        loop {
            if self.read_end()? {
                return Ok(());
            }
            self.skip_values(group)?;
        }
    }

    /// Skip whatever follows until the input ends (a fuzzing and diagnostics aid).
    pub fn skip_all(&mut self) -> Result<usize> {
        let mut n = 0;
        while !self.is_at_end() {
            self.skip_value()?;
            n += 1;
        }
        Ok(n)
    }
}

/// Number of arguments a Java method descriptor lists (`Ljava/lang/String;I[J` is 3).
pub fn count_descriptor_args(descriptor: &str) -> Result<usize> {
    let bad = || Hessian2Error::BadDescriptor {
        descriptor: descriptor.to_owned(),
    };
    let bytes = descriptor.as_bytes();
    let mut i = 0;
    let mut n = 0;
    while i < bytes.len() {
        while bytes.get(i) == Some(&b'[') {
            i += 1;
        }
        match bytes.get(i) {
            Some(b'Z' | b'B' | b'C' | b'D' | b'F' | b'I' | b'J' | b'S' | b'V') => i += 1,
            Some(b'L') => {
                let end = bytes[i..].iter().position(|&b| b == b';').ok_or_else(bad)?;
                if end < 2 {
                    return Err(bad());
                }
                i += end + 1;
            }
            _ => return Err(bad()),
        }
        n += 1;
    }
    Ok(n)
}

/// Number of UTF-16 code units in `s` (Hessian2's string length).
fn utf16_units(s: &str) -> usize {
    s.chars().map(char::len_utf16).sum()
}

/// Append `s` as a Hessian2 string, chunked like the Java writer.
pub fn write_string(out: &mut Vec<u8>, s: &str) {
    let mut rest = s;
    // Non-final chunks of STRING_CHUNK units, never splitting a surrogate pair.
    while utf16_units(rest) > STRING_CHUNK {
        let mut units = 0;
        let mut split = 0;
        for (i, c) in rest.char_indices() {
            if units + c.len_utf16() > STRING_CHUNK {
                break;
            }
            units += c.len_utf16();
            split = i + c.len_utf8();
        }
        out.push(tag::STRING_CHUNK);
        out.extend_from_slice(&(units as u16).to_be_bytes());
        out.extend_from_slice(&rest.as_bytes()[..split]);
        rest = &rest[split..];
    }
    let units = utf16_units(rest);
    if units <= STRING_DIRECT_MAX {
        out.push(units as u8);
    } else if units <= STRING_SHORT_MAX {
        out.push(0x30 + (units >> 8) as u8);
        out.push(units as u8);
    } else {
        out.push(tag::STRING_FINAL);
        out.extend_from_slice(&(units as u16).to_be_bytes());
    }
    out.extend_from_slice(rest.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn string_bytes(s: &str) -> Vec<u8> {
        let mut out = Vec::new();
        write_string(&mut out, s);
        out
    }

    #[test]
    fn ints_in_every_width() {
        for (bytes, want) in [
            (&[0x90][..], 0),
            (&[0x80][..], -16),
            (&[0xbf][..], 47),
            (&[0xc8, 0x30][..], 48),
            (&[0xc0, 0x00][..], -2048),
            (&[0xd4, 0x08, 0x00][..], 2048),
            (&[0xd0, 0x00, 0x00][..], -262_144),
            (&[b'I', 0x7f, 0xff, 0xff, 0xff][..], i32::MAX),
        ] {
            let mut r = Reader::new(bytes);
            assert_eq!(r.read_int().unwrap(), want, "{bytes:02x?}");
            assert!(r.is_at_end());
        }
    }

    #[test]
    fn strings_round_trip_through_every_form() {
        for s in [
            "",
            "a",
            &"x".repeat(31),
            &"y".repeat(32),
            &"z".repeat(1023),
            &"w".repeat(1024),
        ] {
            let bytes = string_bytes(s);
            let mut r = Reader::new(&bytes);
            assert_eq!(r.read_string().unwrap(), s);
            assert!(r.is_at_end());
        }
        let long = "é".repeat(STRING_CHUNK + 10);
        let bytes = string_bytes(&long);
        assert_eq!(bytes[0], tag::STRING_CHUNK);
        assert_eq!(Reader::new(&bytes).read_string().unwrap(), long);
        // Length counts UTF-16 units: one 4-byte character is two units.
        let emoji = string_bytes("\u{1f980}");
        assert_eq!(emoji[0], 2);
        assert_eq!(Reader::new(&emoji).read_string().unwrap(), "\u{1f980}");
    }

    #[test]
    fn skips_every_kind_of_value() {
        let mut body = Vec::new();
        body.extend_from_slice(&[tag::NULL, tag::TRUE, tag::FALSE, 0x90, 0xc8, 0x30, 0xd4, 0, 0]);
        body.extend_from_slice(&[tag::INT, 0, 0, 0, 1, 0xe0, 0xf8, 1, 0x3c, 0, 1]);
        body.extend_from_slice(&[tag::LONG_INT, 0, 0, 0, 1, tag::LONG, 0, 0, 0, 0, 0, 0, 0, 1]);
        body.extend_from_slice(&[
            tag::DOUBLE,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0x5b,
            0x5c,
            0x5d,
            1,
            0x5e,
            0,
            1,
        ]);
        body.extend_from_slice(&[0x5f, 0, 0, 0, 1, tag::DATE_MILLIS, 0, 0, 0, 0, 0, 0, 0, 0]);
        body.extend_from_slice(&[tag::DATE_MINUTES, 0, 0, 0, 0]);
        body.extend_from_slice(&[0x23, 1, 2, 3, 0x34, 2, 9, 9]);
        body.extend_from_slice(&[tag::BINARY_CHUNK, 0, 1, 7, tag::BINARY_FINAL, 0, 1, 8]);
        body.extend_from_slice(&[tag::STRING_CHUNK, 0, 1, b'a', 0x01, b'b']);
        // Lists: untyped/typed, fixed/variable, compact.
        body.extend_from_slice(&[0x7a, 0x91, 0x92, tag::UNTYPED_FIXED_LIST, 0x92, 0x91, 0x92]);
        body.extend_from_slice(&[tag::UNTYPED_LIST, 0x91, tag::END]);
        body.extend_from_slice(&[0x71, 0x03, b'[', b'i', b'n', 0x91]); // typed compact, defines type 0
        body.extend_from_slice(&[tag::TYPED_FIXED_LIST, 0x90, 0x91, 0x95]); // type ref 0
        body.extend_from_slice(&[tag::TYPED_LIST, 0x90, 0x91, tag::END]);
        // Maps.
        body.extend_from_slice(&[tag::UNTYPED_MAP, 0x01, b'k', 0x01, b'v', tag::END]);
        body.extend_from_slice(&[tag::TYPED_MAP, 0x01, b'M', 0x91, tag::NULL, tag::END]);
        // A class definition and instances of it, then a reference.
        body.extend_from_slice(&[
            tag::CLASS_DEF,
            0x01,
            b'P',
            0x92,
            0x01,
            b'x',
            0x01,
            b'y',
            0x60,
            0x91,
            0x92,
        ]);
        body.extend_from_slice(&[tag::OBJECT, 0x90, 0x93, 0x94, tag::REF, 0x90]);
        let mut r = Reader::new(&body);
        let n = r.skip_all().unwrap();
        assert_eq!(n, 35);
    }

    #[test]
    fn malformed_input_is_a_typed_error() {
        let cases: [(&[u8], &str); 9] = [
            (&[0x05, b'a'], "hessian2_truncated"),
            (&[tag::LONG, 0, 0], "hessian2_truncated"),
            (&[0x02, 0xff, 0xff], "hessian2_invalid_utf8"),
            (&[tag::END], "hessian2_unexpected_tag"),
            (&[0x40], "hessian2_unexpected_tag"),
            (&[0x61, 0x90], "hessian2_bad_class_ref"),
            (&[tag::TYPED_FIXED_LIST, 0x90, 0x90], "hessian2_bad_type_ref"),
            (&[tag::UNTYPED_FIXED_LIST, 0x8f], "hessian2_negative_length"),
            (
                &[tag::UNTYPED_FIXED_LIST, tag::INT, 0x7f, 0xff, 0xff, 0xff, 0x90],
                "hessian2_truncated",
            ),
        ];
        for (bytes, reason) in cases {
            let err = Reader::new(bytes).skip_value().unwrap_err();
            assert_eq!(err.reason(), reason, "{bytes:02x?}: {err}");
        }
        let deep = vec![tag::UNTYPED_LIST; MAX_DEPTH + 1];
        assert_eq!(
            Reader::new(&deep).skip_value().unwrap_err(),
            Hessian2Error::TooDeep { max: MAX_DEPTH }
        );
    }

    #[test]
    fn skips_every_kind_of_draft_value() {
        let mut body = Vec::new();
        // Scalars: null, booleans, ints, longs (w), doubles (g h i j k D), date (d), refs (J K R).
        body.extend_from_slice(&[tag::NULL, tag::TRUE, tag::FALSE, 0x90, 0xc8, 0x30, 0xd4, 0, 0]);
        body.extend_from_slice(&[
            0xe0,
            0xf8,
            1,
            0x3c,
            0,
            1,
            b'w',
            0,
            0,
            0,
            1,
            tag::LONG,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            1,
        ]);
        body.extend_from_slice(&[b'g', b'h', b'i', 1, b'j', 0, 1, b'k', 0, 0, 0, 0]);
        body.extend_from_slice(&[tag::DOUBLE, 0, 0, 0, 0, 0, 0, 0, 0, b'd', 0, 0, 0, 0, 0, 0, 0, 0]);
        body.extend_from_slice(&[b'J', 1, b'K', 0, 1, b'R', 0, 0, 0, 1]);
        // Strings (s chunk), binary (b chunk).
        body.extend_from_slice(&[b's', 0, 1, b'a', 0x01, b'b', b'S', 0, 1, b'c']);
        body.extend_from_slice(&[0x22, 1, 2, b'b', 0, 1, 7, tag::BINARY_FINAL, 0, 1, 8]);
        // Lists: typed with a short length, typed by reference, untyped with a long length.
        body.extend_from_slice(&[b'V', b't', 0, 2, b'[', b'x', b'n', 2, 0x91, 0x92, b'z']);
        body.extend_from_slice(&[b'v', 0x90, 0x91, 0x93]);
        body.extend_from_slice(&[b'V', b'l', 0, 0, 0, 1, 0x91, b'z', b'V', 0x91, b'z']);
        // Maps: untyped, typed by reference; H.
        body.extend_from_slice(&[b'M', 0x01, b'k', 0x01, b'v', b'z', b'M', b'u', 0x90, b'z']);
        body.extend_from_slice(&[b'H', 0x91, tag::NULL, b'z']);
        // A class definition with its instance, then another instance.
        body.extend_from_slice(&[
            b'O', 0x91, b'P', 0x92, 0x01, b'x', 0x01, b'y', b'o', 0x90, 0x91, 0x92,
        ]);
        body.extend_from_slice(&[b'o', 0x90, 0x93, 0x94]);
        let mut r = Reader::with_dialect(&body, Dialect::Draft);
        assert_eq!(r.skip_all().unwrap(), 34);

        let cases: [(&[u8], &str); 6] = [
            (&[b'o', 0x90], "hessian2_bad_class_ref"),
            (&[b'v', 0x90, 0x90], "hessian2_bad_type_ref"),
            (&[b'V', b'n', 1, 0x91, 0x91], "hessian2_missing_end"),
            (&[b'V', b'l', 0xff, 0, 0, 0], "hessian2_negative_length"),
            (b"C", "hessian2_unexpected_tag"),
            (&[0x30, 0x01, b'a'], "hessian2_unexpected_tag"),
        ];
        for (bytes, reason) in cases {
            let err = Reader::with_dialect(bytes, Dialect::Draft)
                .skip_value()
                .unwrap_err();
            assert_eq!(err.reason(), reason, "{bytes:02x?}: {err}");
        }
    }

    #[test]
    fn bounded_strings_borrow_one_chunk_and_copy_several() {
        let mut bytes = string_bytes("hello");
        bytes.extend_from_slice(&[tag::STRING_CHUNK, 0, 2, b'a', b'b', 0x01, b'c']);
        bytes.extend(string_bytes("toolong"));
        let mut r = Reader::new(&bytes);
        assert!(matches!(r.read_str_max(5).unwrap(), Some(Cow::Borrowed("hello"))));
        assert!(matches!(r.read_str_max(3).unwrap().as_deref(), Some("abc")));
        assert_eq!(r.read_str_max(6).unwrap(), None);
        assert!(r.is_at_end());
        // `s` chunks in the draft.
        let draft = [b's', 0, 1, b'a', 0x01, b'b'];
        let mut r = Reader::with_dialect(&draft, Dialect::Draft);
        assert_eq!(r.read_str_max(8).unwrap().as_deref(), Some("ab"));
    }

    #[test]
    fn descriptors() {
        assert_eq!(count_descriptor_args("").unwrap(), 0);
        assert_eq!(count_descriptor_args("Ljava/lang/String;IJDZ[B").unwrap(), 6);
        assert_eq!(count_descriptor_args("[[Ljava/lang/String;[[I").unwrap(), 2);
        assert!(count_descriptor_args("Ljava/lang/String").is_err());
        assert!(count_descriptor_args("Q").is_err());
        assert!(count_descriptor_args("[").is_err());
        assert!(count_descriptor_args("L;").is_err());
    }
}
