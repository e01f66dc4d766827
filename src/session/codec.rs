//! The values of a record as the record codec lays them out: one buffer of sorted
//! key and value fields, edited in place.

use std::{cmp::Ordering, sync::Arc};

use crate::{
    session::shape,
    session_store::{Error, Result},
};

/// A record's values, in the form the record codec writes them: a varint count, then
/// for each value its key and its bytes, each after its varint length; keys are UTF-8,
/// unique, and in increasing byte order (the order of `str`). Postcard writes a
/// `BTreeMap<String, Vec<u8>>` the same way.
///
/// The bytes are either shared or owned. A clone shares them: one allocation of
/// exactly their size, which later clones only count (a load from a memory store is a
/// reference count). A change owns them: it edits a vector in place, after copying the
/// shared bytes out if it starts from them, so building a record a value at a time
/// copies nothing. No values is no bytes at all and no allocation, so that equal
/// values are equal bytes and an empty record is free to make.
#[derive(Eq)]
pub(super) enum Data {
    Shared(Arc<[u8]>),
    Owned(Vec<u8>),
}

impl Default for Data {
    fn default() -> Self {
        Self::Owned(Vec::new())
    }
}

impl Clone for Data {
    fn clone(&self) -> Self {
        match self {
            Self::Shared(bytes) => Self::Shared(Arc::clone(bytes)),
            Self::Owned(bytes) if bytes.is_empty() => Self::default(),
            Self::Owned(bytes) => Self::Shared(Arc::from(&bytes[..])),
        }
    }
}

impl PartialEq for Data {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}

/// Where one value sits in [`Data`]'s bytes.
struct Entry {
    /// The first byte of its key's length.
    start: usize,
    /// The first byte of the value itself.
    value: usize,
    /// One past its last byte.
    end: usize,
}

/// A postcard output that appends to a vector it borrows, so that a value is
/// encoded straight into a record's bytes, and a failed encoding can be cut off.
pub(super) struct Append<'a>(pub(super) &'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for Append<'_> {
    type Output = ();

    #[inline]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    #[inline]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

impl Data {
    /// Checks that `bytes` are exactly one encoded set of values, and keeps a copy.
    pub(super) fn decode(bytes: &[u8]) -> Result<Self> {
        Self::check(bytes)?;
        Ok(if bytes.first() == Some(&0) {
            Self::default()
        } else {
            Self::Shared(Arc::from(bytes))
        })
    }

    /// Decodes values written before they had shape tags, giving each the tag
    /// that is never checked: one pass, since the entries are checked in order.
    pub(super) fn decode_untagged(bytes: &[u8]) -> Result<Self> {
        Self::check(bytes)?;
        let mut rest = bytes;
        let count = take_varint(&mut rest).unwrap_or(0);
        if count == 0 {
            return Ok(Self::default());
        }
        let mut out = Vec::with_capacity(bytes.len() + count * (shape::TAG_LEN + 1));
        put_varint(&mut out, count);
        for _ in 0..count {
            // Checked above, so the fields are all there.
            let (Some(key), Some(value)) = (take_field(&mut rest), take_field(&mut rest)) else {
                break;
            };
            put_field(&mut out, key);
            put_varint(&mut out, shape::TAG_LEN + value.len());
            out.extend_from_slice(&shape::UNCHECKED);
            out.extend_from_slice(value);
        }
        Ok(Self::Owned(out))
    }

    /// Checks that `bytes` are exactly one encoded set of values, keys in order. A
    /// value too short for a shape tag is kept: reading it typed is the error.
    pub(super) fn check(bytes: &[u8]) -> Result<()> {
        let corrupt = || Error::decode("truncated or corrupt values in encoded record");
        let mut rest = bytes;
        let count = take_varint(&mut rest).ok_or_else(corrupt)?;
        let mut previous: Option<&str> = None;
        for _ in 0..count {
            let key = take_field(&mut rest).ok_or_else(corrupt)?;
            let key = std::str::from_utf8(key).map_err(Error::decode)?;
            take_field(&mut rest).ok_or_else(corrupt)?;
            match previous.map(|previous| previous.cmp(key)) {
                None | Some(Ordering::Less) => {}
                Some(Ordering::Equal) => {
                    return Err(Error::decode(format!(
                        "duplicate key {key:?} in encoded record"
                    )));
                }
                Some(Ordering::Greater) => {
                    return Err(Error::decode(format!(
                        "key {key:?} out of order in encoded record"
                    )));
                }
            }
            previous = Some(key);
        }
        if !rest.is_empty() {
            return Err(Error::decode(format!(
                "{} trailing bytes after the encoded record",
                rest.len()
            )));
        }
        Ok(())
    }

    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            Self::Shared(bytes) => bytes,
            Self::Owned(bytes) => bytes,
        }
    }

    /// The bytes, to change: copied out first if they are shared.
    pub(super) fn bytes_mut(&mut self) -> &mut Vec<u8> {
        if let Self::Shared(shared) = self {
            // Room for another small value or two.
            let mut owned = Vec::with_capacity(shared.len() + 64);
            owned.extend_from_slice(shared);
            *self = Self::Owned(owned);
        }
        match self {
            Self::Owned(bytes) => bytes,
            Self::Shared(_) => unreachable!("made owned above"),
        }
    }

    pub(super) fn len(&self) -> usize {
        take_varint(&mut self.bytes()).unwrap_or(0)
    }

    /// Iterates over `(key, value)`, in key order.
    pub(super) fn entries(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        let mut rest = self.bytes();
        let count = take_varint(&mut rest).unwrap_or(0);
        // Checked when made, so the fields never run out before the count does.
        (0..count).map_while(move |_| Some((take_field(&mut rest)?, take_field(&mut rest)?)))
    }

    pub(super) fn get(&self, key: &str) -> Option<&[u8]> {
        let entry = self.find(key).ok()?;
        Some(&self.bytes()[entry.value..entry.end])
    }

    /// Finds where `key` goes: its entry, if there is one, and otherwise the offset
    /// of the first entry after it (the end of the bytes if none).
    fn find(&self, key: &str) -> std::result::Result<Entry, usize> {
        let bytes = self.bytes();
        let mut rest = bytes;
        let count = take_varint(&mut rest).unwrap_or(0);
        for _ in 0..count {
            let start = bytes.len() - rest.len();
            // Checked when made, so the fields never run out before the count does.
            let (Some(k), Some(value)) = (take_field(&mut rest), take_field(&mut rest)) else {
                break;
            };
            // Keys mostly differ in their first byte: compare that before calling
            // for the whole comparison.
            let order = match (k.first(), key.as_bytes().first()) {
                (Some(a), Some(b)) if a != b => a.cmp(b),
                _ => k.cmp(key.as_bytes()),
            };
            match order {
                Ordering::Less => {}
                Ordering::Equal => {
                    let end = bytes.len() - rest.len();
                    return Ok(Entry {
                        start,
                        value: end - value.len(),
                        end,
                    });
                }
                Ordering::Greater => return Err(start),
            }
        }
        Err(bytes.len())
    }

    /// Sets `key` to the value that `write` appends to the vector it is given, and
    /// returns the entry it replaced. On an error from `write`, nothing changes.
    /// The old value's bytes come back only when `keep_old` asks for them.
    pub(super) fn put<E>(
        &mut self,
        key: &str,
        keep_old: bool,
        write: impl FnOnce(&mut Vec<u8>) -> std::result::Result<(), E>,
    ) -> std::result::Result<Option<Vec<u8>>, E> {
        let found = self.find(key);
        let bytes = self.bytes_mut();
        if bytes.is_empty() {
            // Room for a few small values: records are built a value at a time.
            bytes.reserve(192);
            bytes.push(0);
        }
        // The new entry is written at the end, its value's length guessed to take one
        // byte (under 128 bytes) and widened if not; one rotation moves it in place.
        let entry_at = bytes.len();
        put_field(bytes, key.as_bytes());
        let len_at = bytes.len();
        bytes.push(0);
        // A value's `Serialize` is the caller's code: if it fails, or panics and the
        // panic is caught, what it wrote is cut off and the record is as it was.
        let mut unwritten = Unwritten {
            bytes,
            keep: Some(if entry_at == 1 { 0 } else { entry_at }),
        };
        write(unwritten.bytes)?;
        unwritten.keep = None;
        let bytes = &mut *unwritten.bytes;
        let value_len = bytes.len() - len_at - 1;
        replace_varint(bytes, len_at, 1, value_len);
        let entry_len = bytes.len() - entry_at;
        let at = match &found {
            Ok(old) => old.start,
            // No values had no count either: the first entry goes after the one
            // written above.
            Err(at) => (*at).max(1),
        };
        if at < entry_at {
            bytes[at..].rotate_right(entry_len);
        }
        let old = match found {
            Ok(old) => {
                // The old entry now follows the new one.
                let shift = entry_len;
                let value = keep_old.then(|| bytes[old.value + shift..old.end + shift].to_vec());
                bytes.drain(old.start + shift..old.end + shift);
                value
            }
            Err(_) => {
                let count = take_varint(&mut &bytes[..]).unwrap_or(0);
                set_count(bytes, count + 1);
                None
            }
        };
        Ok(old)
    }

    /// Sets `key` to `value` and returns the bytes it replaced.
    pub(super) fn set(&mut self, key: &str, value: &[u8]) -> Option<Vec<u8>> {
        if self.get(key) == Some(value) {
            // Nothing changes: values shared with clones stay shared.
            return Some(value.to_vec());
        }
        let put = self.put(key, true, |bytes| {
            bytes.extend_from_slice(value);
            Ok::<(), std::convert::Infallible>(())
        });
        match put {
            Ok(old) => old,
            Err(never) => match never {},
        }
    }

    /// Removes `key` and returns its bytes. Leaves shared values shared when there
    /// is no such key.
    pub(super) fn remove(&mut self, key: &str) -> Option<Vec<u8>> {
        let entry = self.find(key).ok()?;
        let count = self.len() - 1;
        if count == 0 {
            let value = self.bytes()[entry.value..entry.end].to_vec();
            *self = Self::default();
            return Some(value);
        }
        let bytes = self.bytes_mut();
        let value = bytes[entry.value..entry.end].to_vec();
        bytes.drain(entry.start..entry.end);
        set_count(bytes, count);
        Some(value)
    }
}

/// A new entry being written at the end of a record's bytes: dropped, it cuts the
/// bytes back to `keep`, unless `keep` was taken away once the entry was written.
struct Unwritten<'a> {
    bytes: &'a mut Vec<u8>,
    keep: Option<usize>,
}

impl Drop for Unwritten<'_> {
    fn drop(&mut self) {
        if let Some(keep) = self.keep {
            self.bytes.truncate(keep);
        }
    }
}

/// Rewrites the varint count at the front of `bytes`.
fn set_count(bytes: &mut Vec<u8>, count: usize) {
    let mut rest = &bytes[..];
    take_varint(&mut rest);
    let old_len = bytes.len() - rest.len();
    replace_varint(bytes, 0, old_len, count);
}

/// Replaces the `old_len`-byte varint at `at` in `bytes` with `value`'s.
#[inline]
fn replace_varint(bytes: &mut Vec<u8>, at: usize, old_len: usize, value: usize) {
    if value < 0x80 && old_len == 1 {
        bytes[at] = value as u8;
        return;
    }
    let mut new = Vec::with_capacity(10);
    put_varint(&mut new, value);
    bytes.splice(at..at + old_len, new);
}

/// Reads a varint (LEB128, as postcard writes lengths) from the front of `bytes`.
/// Returns `None` for a truncated, overlong or overflowing one.
#[inline(always)]
pub(super) fn take_varint(bytes: &mut &[u8]) -> Option<usize> {
    // Lengths and counts under 128, nearly all of them, are one byte.
    match bytes.split_first() {
        Some((&byte, rest)) if byte < 0x80 => {
            *bytes = rest;
            Some(usize::from(byte))
        }
        _ => take_long_varint(bytes),
    }
}

/// [`take_varint`] of a varint longer than one byte.
#[inline(never)]
fn take_long_varint(bytes: &mut &[u8]) -> Option<usize> {
    let mut value: u64 = 0;
    for (at, &byte) in bytes.iter().enumerate().take(10) {
        let low = u64::from(byte & 0x7f);
        let shift = 7 * at as u32;
        if shift == 63 && low > 1 {
            return None;
        }
        value |= low << shift;
        if byte & 0x80 == 0 {
            // A zero last byte after the first is a longer form of a shorter varint:
            // refused, so that equal records are always equal bytes.
            if byte == 0 && at > 0 {
                return None;
            }
            *bytes = bytes.get(at + 1..)?;
            return usize::try_from(value).ok();
        }
    }
    None
}

/// Reads a varint length and that many bytes from the front of `bytes`.
#[inline(always)]
pub(super) fn take_field<'a>(bytes: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = take_varint(bytes)?;
    let (field, rest) = bytes.split_at_checked(len)?;
    *bytes = rest;
    Some(field)
}

pub(super) fn put_varint(bytes: &mut Vec<u8>, mut value: usize) {
    while value >= 0x80 {
        bytes.push(value as u8 | 0x80);
        value >>= 7;
    }
    bytes.push(value as u8);
}

pub(super) fn put_field(bytes: &mut Vec<u8>, field: &[u8]) {
    put_varint(bytes, field.len());
    bytes.extend_from_slice(field);
}
