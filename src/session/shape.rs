//! A value's shape tag: two bytes stored in front of each value's postcard bytes, so
//! that a value read as another type is an error, never a wrong value.
//!
//! Postcard records no types: `4u64` read as an `i64` is `2`, an empty list read as
//! a number is `0`. The tag is a hash of the value's shape as serde's data model
//! sees it while serializing: the kind of each primitive (classed by how postcard
//! encodes it, so `u32` and `u64`, both varints, share a class and a field may
//! widen), the length of each sequence and map, the names of struct fields and enum
//! variants (not of the types: renaming a type keeps its sessions). Reading decodes
//! with postcard, then hashes the decoded value's shape the same way: a type that
//! reads the bytes as something else gets another shape, and the read fails.
//!
//! Tag `[0, 0]` means "unchecked": values from before tags existed, or stored raw by
//! a caller. A hash that comes out zero is made one.
//!
//! The hash is part of the stored format: tags written by one version are checked
//! by the next, so changing it needs a new record format version.

use serde::{ser, Serialize};

use crate::session_store::{Error, Result};

/// The length of the tag in front of each value's postcard bytes.
pub(crate) const TAG_LEN: usize = 2;

/// The tag of a value whose shape is not checked.
pub(crate) const UNCHECKED: [u8; TAG_LEN] = [0, 0];

/// Encodes `value` as a record stores it: its shape tag, then its postcard bytes.
pub(crate) fn encode_value<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>> {
    let tag = tag_of(value)?;
    let mut bytes = Vec::with_capacity(16);
    bytes.extend_from_slice(&tag);
    postcard::serialize_with_flavor(value, super::codec::Append(&mut bytes))
        .map_err(Error::encode)?;
    Ok(bytes)
}

/// The shape tag of `value`.
///
/// # Errors
///
/// Returns [`Error::Encode`] when the value's `Serialize` fails.
pub(crate) fn tag_of<T: Serialize + ?Sized>(value: &T) -> Result<[u8; TAG_LEN]> {
    let mut shape = Shape::new();
    value.serialize(&mut shape).map_err(Error::encode)?;
    Ok(shape.tag())
}

/// Hashes a serde data-model walk, one multiply per event (its kind and its length
/// packed into one word) and per eight bytes of a name, as FxHash mixes: a value's
/// shape is hashed on every insert and every typed read, so each step counts.
struct Shape(u64);

/// What a value's `Serialize` said that this walk cannot hash.
#[derive(Debug)]
struct ShapeError(String);

impl std::fmt::Display for ShapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShapeError {}

impl ser::Error for ShapeError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        Self(msg.to_string())
    }
}

// One byte per kind of event. Primitives are classed by postcard's encoding.
const BOOL: u8 = 1;
const U8: u8 = 2;
const I8: u8 = 3;
const UNSIGNED: u8 = 4;
const SIGNED: u8 = 5;
const F32: u8 = 6;
const F64: u8 = 7;
const STR: u8 = 8;
const BYTES: u8 = 9;
const NONE: u8 = 10;
const SOME: u8 = 11;
const UNIT: u8 = 12;
const VARIANT: u8 = 13;
const SEQ: u8 = 14;
const TUPLE: u8 = 15;
const MAP: u8 = 16;
const STRUCT: u8 = 17;
const END: u8 = 18;
const NAME: u8 = 19;

impl Shape {
    fn new() -> Self {
        Self(0)
    }

    #[inline(always)]
    fn mix(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    /// An event of a kind with no length.
    #[inline(always)]
    fn byte(&mut self, kind: u8) {
        self.mix(u64::from(kind));
    }

    /// An event of a kind with a length.
    #[inline(always)]
    fn sized(&mut self, kind: u8, len: usize) {
        self.mix(u64::from(kind) | (len as u64) << 8);
    }

    /// A field or variant name.
    #[inline(always)]
    fn name(&mut self, name: &str) {
        self.sized(NAME, name.len());
        let mut chunks = name.as_bytes().chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.mix(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.mix(u64::from_le_bytes(word));
        }
    }

    fn tag(&self) -> [u8; TAG_LEN] {
        // The top bits are the best mixed; zero stays "unchecked".
        let top = (self.0 >> 48) as u16;
        top.max(1).to_le_bytes()
    }
}

type Walk<'a> = &'a mut Shape;

/// The shape of one element (or map key, or value) on its own.
fn sub_shape<T: Serialize + ?Sized>(value: &T) -> Result<u64, ShapeError> {
    let mut shape = Shape::new();
    value.serialize(&mut shape)?;
    Ok(shape.0)
}

/// A sequence or map: its elements' shapes are summed, not chained, so that the
/// order they come in does not count. A `HashMap` or `HashSet` decoded from the
/// bytes iterates in another order than the one that was stored; what it holds
/// is the same.
struct Unordered<'a> {
    shape: &'a mut Shape,
    sum: u64,
    key: u64,
}

impl<'a> Unordered<'a> {
    fn new(shape: &'a mut Shape) -> Self {
        Self {
            shape,
            sum: 0,
            key: 0,
        }
    }

    fn add(&mut self, element: u64) {
        self.sum = self.sum.wrapping_add(element);
    }

    fn end(self) {
        self.shape.mix(self.sum);
        self.shape.byte(END);
    }
}

impl<'a> ser::Serializer for &'a mut Shape {
    type Ok = ();
    type Error = ShapeError;
    type SerializeSeq = Unordered<'a>;
    type SerializeTuple = Walk<'a>;
    type SerializeTupleStruct = Walk<'a>;
    type SerializeTupleVariant = Walk<'a>;
    type SerializeMap = Unordered<'a>;
    type SerializeStruct = Walk<'a>;
    type SerializeStructVariant = Walk<'a>;

    fn is_human_readable(&self) -> bool {
        // As postcard: types that serialize differently for humans take the compact
        // form here too.
        false
    }

    fn serialize_bool(self, _: bool) -> Result<(), ShapeError> {
        self.byte(BOOL);
        Ok(())
    }
    fn serialize_i8(self, _: i8) -> Result<(), ShapeError> {
        self.byte(I8);
        Ok(())
    }
    fn serialize_i16(self, _: i16) -> Result<(), ShapeError> {
        self.byte(SIGNED);
        Ok(())
    }
    fn serialize_i32(self, _: i32) -> Result<(), ShapeError> {
        self.byte(SIGNED);
        Ok(())
    }
    fn serialize_i64(self, _: i64) -> Result<(), ShapeError> {
        self.byte(SIGNED);
        Ok(())
    }
    fn serialize_i128(self, _: i128) -> Result<(), ShapeError> {
        self.byte(SIGNED);
        Ok(())
    }
    fn serialize_u8(self, _: u8) -> Result<(), ShapeError> {
        self.byte(U8);
        Ok(())
    }
    fn serialize_u16(self, _: u16) -> Result<(), ShapeError> {
        self.byte(UNSIGNED);
        Ok(())
    }
    fn serialize_u32(self, _: u32) -> Result<(), ShapeError> {
        self.byte(UNSIGNED);
        Ok(())
    }
    fn serialize_u64(self, _: u64) -> Result<(), ShapeError> {
        self.byte(UNSIGNED);
        Ok(())
    }
    fn serialize_u128(self, _: u128) -> Result<(), ShapeError> {
        self.byte(UNSIGNED);
        Ok(())
    }
    fn serialize_f32(self, _: f32) -> Result<(), ShapeError> {
        self.byte(F32);
        Ok(())
    }
    fn serialize_f64(self, _: f64) -> Result<(), ShapeError> {
        self.byte(F64);
        Ok(())
    }
    fn serialize_char(self, _: char) -> Result<(), ShapeError> {
        // Postcard writes a char as a one-character string.
        self.byte(STR);
        Ok(())
    }
    fn serialize_str(self, _: &str) -> Result<(), ShapeError> {
        self.byte(STR);
        Ok(())
    }
    fn serialize_bytes(self, _: &[u8]) -> Result<(), ShapeError> {
        self.byte(BYTES);
        Ok(())
    }
    fn serialize_none(self) -> Result<(), ShapeError> {
        self.byte(NONE);
        Ok(())
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), ShapeError> {
        self.byte(SOME);
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<(), ShapeError> {
        self.byte(UNIT);
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<(), ShapeError> {
        self.byte(UNIT);
        Ok(())
    }
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<(), ShapeError> {
        self.byte(VARIANT);
        self.name(variant);
        self.byte(UNIT);
        Ok(())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<(), ShapeError> {
        // Postcard writes a newtype as its content: `UserId(u64)` and `u64` are one
        // shape, so a field can gain or lose its wrapper.
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<(), ShapeError> {
        self.byte(VARIANT);
        self.name(variant);
        value.serialize(self)
    }
    fn serialize_seq(self, len: Option<usize>) -> Result<Unordered<'a>, ShapeError> {
        self.sized(SEQ, len.unwrap_or(usize::MAX));
        Ok(Unordered::new(self))
    }
    fn serialize_tuple(self, len: usize) -> Result<Walk<'a>, ShapeError> {
        self.sized(TUPLE, len);
        Ok(self)
    }
    fn serialize_tuple_struct(self, _: &'static str, len: usize) -> Result<Walk<'a>, ShapeError> {
        self.serialize_tuple(len)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Walk<'a>, ShapeError> {
        self.byte(VARIANT);
        self.name(variant);
        self.serialize_tuple(len)
    }
    fn serialize_map(self, len: Option<usize>) -> Result<Unordered<'a>, ShapeError> {
        self.sized(MAP, len.unwrap_or(usize::MAX));
        Ok(Unordered::new(self))
    }
    fn serialize_struct(self, _: &'static str, len: usize) -> Result<Walk<'a>, ShapeError> {
        self.sized(STRUCT, len);
        Ok(self)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        len: usize,
    ) -> Result<Walk<'a>, ShapeError> {
        self.byte(VARIANT);
        self.name(variant);
        self.serialize_struct("", len)
    }
}

/// The compound parts: each element's shape in turn, then an end.
macro_rules! compound {
    ($trait:ident, $method:ident) => {
        impl ser::$trait for &mut Shape {
            type Ok = ();
            type Error = ShapeError;

            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ShapeError> {
                value.serialize(&mut **self)
            }

            fn end(self) -> Result<(), ShapeError> {
                self.byte(END);
                Ok(())
            }
        }
    };
}

compound!(SerializeTuple, serialize_element);
compound!(SerializeTupleStruct, serialize_field);
compound!(SerializeTupleVariant, serialize_field);

impl ser::SerializeSeq for Unordered<'_> {
    type Ok = ();
    type Error = ShapeError;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ShapeError> {
        let element = sub_shape(value)?;
        self.add(element);
        Ok(())
    }

    fn end(self) -> Result<(), ShapeError> {
        Unordered::end(self);
        Ok(())
    }
}

impl ser::SerializeMap for Unordered<'_> {
    type Ok = ();
    type Error = ShapeError;

    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<(), ShapeError> {
        self.key = sub_shape(key)?;
        Ok(())
    }

    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ShapeError> {
        // An entry is its key's shape and its value's, in that order.
        let mut entry = Shape(self.key);
        entry.mix(sub_shape(value)?);
        self.add(entry.0);
        Ok(())
    }

    fn end(self) -> Result<(), ShapeError> {
        Unordered::end(self);
        Ok(())
    }
}

/// Struct fields: each name, then its value's shape.
macro_rules! fields {
    ($trait:ident) => {
        impl ser::$trait for &mut Shape {
            type Ok = ();
            type Error = ShapeError;

            fn serialize_field<T: Serialize + ?Sized>(
                &mut self,
                name: &'static str,
                value: &T,
            ) -> Result<(), ShapeError> {
                self.name(name);
                value.serialize(&mut **self)
            }

            fn end(self) -> Result<(), ShapeError> {
                self.byte(END);
                Ok(())
            }
        }
    };
}

fields!(SerializeStruct);
fields!(SerializeStructVariant);

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashSet};

    use super::*;

    #[derive(Serialize)]
    struct Cart {
        items: Vec<String>,
        total: u64,
    }

    #[derive(Serialize)]
    struct Renamed {
        items: Vec<String>,
        sum: u64,
    }

    #[derive(Serialize)]
    struct UserId(u64);

    #[derive(Serialize)]
    enum Role {
        Admin,
        Guest,
    }

    /// The shapes sessions hold most, one value each: every tag differs, so none
    /// reads as another.
    #[test]
    fn common_shapes_have_distinct_tags() {
        let tags = [
            tag_of(&true),
            tag_of(&1u8),
            tag_of(&1i8),
            tag_of(&1u64),
            tag_of(&1i64),
            tag_of(&1.0f32),
            tag_of(&1.0f64),
            tag_of("text"),
            tag_of(&serde_bytes_like()),
            tag_of(&None::<u64>),
            tag_of(&Some(1u64)),
            tag_of(&Some("text")),
            tag_of(&()),
            tag_of(&Vec::<String>::new()),
            tag_of(&vec!["a".to_owned()]),
            tag_of(&vec![1u64]),
            tag_of(&vec![1u64, 2]),
            tag_of(&(1u64, "a")),
            tag_of(&("a", 1u64)),
            tag_of(&BTreeMap::from([("k", 1u64)])),
            tag_of(&Cart {
                items: vec![],
                total: 0,
            }),
            tag_of(&Renamed {
                items: vec![],
                sum: 0,
            }),
            tag_of(&Role::Admin),
            tag_of(&Role::Guest),
        ]
        .map(Result::unwrap);
        let distinct: HashSet<_> = tags.iter().collect();
        assert_eq!(distinct.len(), tags.len(), "{tags:?}");
        assert!(!tags.contains(&UNCHECKED));
    }

    fn serde_bytes_like() -> impl Serialize {
        struct Bytes;
        impl Serialize for Bytes {
            fn serialize<S: ser::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
                s.serialize_bytes(b"ab")
            }
        }
        Bytes
    }

    /// A hash-keyed map or set decoded from the bytes iterates in another order
    /// than the one stored, with elements of different shapes: it still reads.
    #[test]
    fn hashed_collections_read_back_whatever_their_order() {
        use std::collections::{HashMap, HashSet};

        #[derive(Serialize, serde::Deserialize, PartialEq, Eq, Hash, Debug)]
        enum Role {
            Admin,
            Editor,
            Guest,
        }
        let mut record = crate::session::Record::new(time::OffsetDateTime::UNIX_EPOCH);
        let roles = HashSet::from([Role::Admin, Role::Editor, Role::Guest]);
        let notes: HashMap<String, Option<Vec<String>>> = (0..16)
            .map(|n| {
                let note = (n % 3 != 0).then(|| vec!["x".to_owned(); n % 4]);
                (format!("key{n}"), note)
            })
            .collect();
        record.insert("roles", &roles).unwrap();
        record.insert("notes", &notes).unwrap();
        // Each decoded map or set gets a fresh random order.
        for _ in 0..50 {
            let read = record.get::<HashSet<Role>>("roles").unwrap();
            assert_eq!(read.as_ref(), Some(&roles));
            let read = record
                .get::<HashMap<String, Option<Vec<String>>>>("notes")
                .unwrap();
            assert_eq!(read.as_ref(), Some(&notes));
        }
        // Still a mismatch for another type.
        assert!(record.get::<HashSet<String>>("roles").is_err());
        assert!(record.get::<HashMap<String, Vec<String>>>("notes").is_err());
    }

    /// What postcard reads the same way shares a shape: widths of one varint
    /// class, a newtype and its content, a string and a `&str`.
    #[test]
    fn encodings_postcard_reads_alike_share_a_tag() {
        let same = |a: Result<[u8; 2]>, b: Result<[u8; 2]>| assert_eq!(a.unwrap(), b.unwrap());
        same(tag_of(&7u32), tag_of(&7u64));
        same(tag_of(&-7i16), tag_of(&-7i128));
        same(tag_of(&UserId(7)), tag_of(&7u64));
        same(tag_of("alice"), tag_of(&"alice".to_owned()));
        same(tag_of(&'a'), tag_of("a"));
    }
}
