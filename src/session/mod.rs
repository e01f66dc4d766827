//! Session identifiers and records.
//!
//! An [`Id`] is the random bearer token that travels in the session cookie; a
//! [`Record`] is what a [`SessionStore`](crate::SessionStore) keeps under it: the id,
//! an expiry date and a map of values, each already encoded with postcard. A
//! [`Session`] is a request's handle on one record; [`Expiry`] and [`SessionConfig`]
//! decide when it ends.

use std::{cmp::Ordering, fmt, str::FromStr, sync::Arc};

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use time::OffsetDateTime;

use crate::session_store::{Error, Result};

pub(crate) mod expiry;
pub(crate) mod handle;
mod random;
mod shape;

pub(crate) use self::shape::encode_value;

pub use self::{
    expiry::{Expiry, SessionConfig},
    handle::Session,
};

/// A session identifier: 128 bits drawn from the operating system's CSPRNG.
///
/// Its text form ([`Display`](fmt::Display) / [`FromStr`]) is the 22-character unpadded
/// base64url encoding of the id's 16 little-endian bytes, the same form tower-sessions
/// puts in its cookies, so ids issued by it parse here and print back identically.
///
/// Ids are bearer credentials that tend to end up in logs, so [`Debug`](fmt::Debug)
/// prints only their first four characters.
///
/// `Id` is `Copy`, `Eq`, `Hash` and `Ord`, so it can key any map.
///
/// # Examples
///
/// ```
/// use portable_sessions::session::Id;
///
/// let id = Id::default(); // a fresh random id
/// let text = id.to_string();
/// assert_eq!(text.len(), 22);
/// assert_eq!(text.parse::<Id>().unwrap(), id);
/// assert!("not an id".parse::<Id>().is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(u128);

impl Id {
    /// The length of an id's text form.
    pub const TEXT_LEN: usize = 22;

    /// Draws a fresh id from the operating system's CSPRNG.
    ///
    /// Each thread reads the CSPRNG 4 KiB at a time and hands out those bytes 16 at a
    /// time, each once: one system call per 256 ids instead of one per id. No
    /// generator of ours stretches them. A process forked from this one (through
    /// `fork`, which runs `pthread_atfork` handlers) throws away the bytes it
    /// inherited unread, so parent and child never hand out the same id.
    ///
    /// # Errors
    ///
    /// Returns the operating system's error if it cannot supply random bytes.
    pub fn try_random() -> std::result::Result<Self, getrandom::Error> {
        random::bytes16().map(Self::from_bytes)
    }

    /// Makes an id from its 16 little-endian bytes.
    ///
    /// Only for ids that were drawn at random before (read back from storage, say):
    /// an id is a credential, and a guessable one is a session anyone can take over.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        Self(u128::from_le_bytes(bytes))
    }

    /// Returns the id's 16 little-endian bytes.
    pub const fn to_bytes(self) -> [u8; 16] {
        self.0.to_le_bytes()
    }

    fn encode_text(self) -> [u8; Self::TEXT_LEN] {
        let bytes = self.to_bytes();
        let mut out = [0u8; Self::TEXT_LEN];
        // Five groups of three bytes make twenty characters; the last byte makes two.
        for (group, chunk) in bytes[..15].chunks_exact(3).enumerate() {
            let n = u32::from(chunk[0]) << 16 | u32::from(chunk[1]) << 8 | u32::from(chunk[2]);
            for k in 0..4 {
                out[group * 4 + k] = B64[(n >> (18 - 6 * k) & 63) as usize];
            }
        }
        out[20] = B64[usize::from(bytes[15] >> 2)];
        out[21] = B64[usize::from(bytes[15] & 3) << 4];
        out
    }
}

/// Draws a fresh id for the crate's own use: an error, never a panic, when the
/// operating system cannot supply random bytes.
pub(crate) fn random_id() -> Result<Id> {
    #[cfg(test)]
    if tests::RNG_FAILS.with(std::cell::Cell::get) {
        return Err(Error::backend(
            "the operating system's random number generator failed: injected",
        ));
    }
    Id::try_random().map_err(|err| {
        Error::backend(format!(
            "the operating system's random number generator failed: {err}"
        ))
    })
}

impl Default for Id {
    /// Draws a fresh random id, like [`Id::try_random`].
    ///
    /// # Panics
    ///
    /// Panics if the operating system cannot supply random bytes, which on the
    /// supported platforms only happens when the system itself is broken.
    fn default() -> Self {
        Self::try_random().expect("the operating system's random number generator failed")
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

fn b64_value(c: u8) -> Option<u32> {
    let v = match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'-' => 62,
        b'_' => 63,
        _ => return None,
    };
    Some(u32::from(v))
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.encode_text();
        // The alphabet is ASCII, so this cannot fail.
        f.write_str(std::str::from_utf8(&text).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.encode_text();
        let prefix = std::str::from_utf8(&text[..4]).map_err(|_| fmt::Error)?;
        write!(f, "Id({prefix}…)")
    }
}

/// The error returned when text is not a valid session [`Id`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseIdError {
    kind: ParseIdErrorKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ParseIdErrorKind {
    Length(usize),
    Character(usize),
    TrailingBits,
}

impl fmt::Display for ParseIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ParseIdErrorKind::Length(len) => write!(
                f,
                "invalid session id: expected {} characters, found {len} bytes",
                Id::TEXT_LEN
            ),
            ParseIdErrorKind::Character(at) => write!(
                f,
                "invalid session id: byte {at} is not an unpadded base64url character"
            ),
            ParseIdErrorKind::TrailingBits => {
                f.write_str("invalid session id: not the canonical encoding of 16 bytes")
            }
        }
    }
}

impl std::error::Error for ParseIdError {}

impl FromStr for Id {
    type Err = ParseIdError;

    /// Parses exactly 22 characters of unpadded base64url; anything else is an error.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let text = s.as_bytes();
        if text.len() != Self::TEXT_LEN {
            return Err(ParseIdError {
                kind: ParseIdErrorKind::Length(text.len()),
            });
        }
        let mut values = [0u32; Self::TEXT_LEN];
        for (at, (&c, v)) in text.iter().zip(values.iter_mut()).enumerate() {
            *v = b64_value(c).ok_or(ParseIdError {
                kind: ParseIdErrorKind::Character(at),
            })?;
        }
        // 22 characters carry 132 bits; the last 4 must be zero or two texts would
        // name one id.
        if values[21] & 15 != 0 {
            return Err(ParseIdError {
                kind: ParseIdErrorKind::TrailingBits,
            });
        }
        let mut bytes = [0u8; 16];
        for (group, quad) in values[..20].chunks_exact(4).enumerate() {
            let n = quad[0] << 18 | quad[1] << 12 | quad[2] << 6 | quad[3];
            bytes[group * 3..group * 3 + 3].copy_from_slice(&n.to_be_bytes()[1..]);
        }
        bytes[15] = (values[20] << 2 | values[21] >> 4) as u8;
        Ok(Self::from_bytes(bytes))
    }
}

impl Serialize for Id {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(
                std::str::from_utf8(&self.encode_text()).map_err(serde::ser::Error::custom)?,
            )
        } else {
            self.to_bytes().serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            <[u8; 16]>::deserialize(deserializer).map(Self::from_bytes)
        }
    }
}

/// What a store keeps for one session: its id, when it expires, and its values.
///
/// Each value is held already encoded with [postcard](https://docs.rs/postcard); the
/// typed [`insert`](Record::insert) and [`get`](Record::get) encode and decode it.
/// postcard is not self-describing (`4u64` read as an `i64` is `2`), so each value
/// carries a two-byte **shape tag** in front of its postcard bytes: a hash of its
/// shape in serde's data model (the kinds of its primitives, as postcard encodes
/// them, the lengths of its lists, the names of its fields and variants, never the
/// names of its types). [`get`](Record::get) hashes the shape of what it decoded and
/// fails with [`Error::Decode`] when the two differ, so a value read as another type
/// (a type changed between two deploys) is an error, never a wrong value. Shapes
/// that postcard reads alike share a tag: a `u32` field may become a `u64`, a `u64`
/// a newtype around one; an empty list reads as an empty list of anything. The
/// raw API ([`get_raw`](Record::get_raw), [`insert_raw`](Record::insert_raw)) takes
/// and gives the stored form, tag included; a tag of `[0, 0]` is never checked
/// (values stored before tags existed read that way).
///
/// All the values live in one allocation, laid out as the record codec writes them, so
/// that [`decode`](Record::decode) is a check and one copy and
/// [`encode`](Record::encode) little more than a copy. A record read from a store, or
/// cloned, shares that allocation: cloning it is a reference count, and a change
/// copies the values once into a buffer of the record's own, which later changes
/// edit in place. Cloning a record changed since it was read copies its values.
///
/// # Examples
///
/// ```
/// use portable_sessions::session::Record;
/// use time::{Duration, OffsetDateTime};
///
/// let mut record = Record::new(OffsetDateTime::now_utc() + Duration::hours(1));
/// record.insert("user_id", &42u64).unwrap();
/// assert_eq!(record.get::<u64>("user_id").unwrap(), Some(42));
/// assert_eq!(record.get::<u64>("missing").unwrap(), None);
///
/// let bytes = record.encode().unwrap();
/// assert_eq!(Record::decode(&bytes).unwrap(), record);
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Record {
    /// The session's id; [`SessionStore::create`](crate::SessionStore::create) may
    /// replace it with a fresh one when it collides.
    pub id: Id,
    /// The moment from which the session no longer loads.
    pub expiry_date: OffsetDateTime,
    /// Which write of the session this is: [`SessionStore::update`] writes only over
    /// the version it was given, and stores the next one.
    ///
    /// [`create`](crate::SessionStore::create) and
    /// [`save`](crate::SessionStore::save) store it as given, and
    /// [`load`](crate::SessionStore::load) returns it. The record codec does not
    /// carry it: a store keeps it beside the encoded bytes, where it can compare it.
    ///
    /// [`SessionStore::update`]: crate::SessionStore::update
    pub version: u64,
    data: Data,
}

impl Record {
    /// The largest encoded record, in bytes, that [`encode`](Record::encode) writes and
    /// [`decode`](Record::decode) reads (1 MiB).
    pub const MAX_ENCODED_LEN: usize = 1 << 20;

    /// The format version written as the first byte of [`encode`](Record::encode)'s
    /// output: values with shape tags. [`decode`](Record::decode) also reads
    /// version 1, whose values have none (they read unchecked).
    pub const FORMAT_VERSION: u8 = 3;

    /// The format version written as the first byte of
    /// [`encode_without_id`](Record::encode_without_id)'s output: values with shape
    /// tags. [`decode_with_id`](Record::decode_with_id) also reads version 2, whose
    /// values have none.
    pub const FORMAT_VERSION_WITHOUT_ID: u8 = 4;

    /// [`FORMAT_VERSION`](Record::FORMAT_VERSION) before values had shape tags.
    pub(crate) const LEGACY_FORMAT_VERSION: u8 = 1;

    /// [`FORMAT_VERSION_WITHOUT_ID`](Record::FORMAT_VERSION_WITHOUT_ID) before values
    /// had shape tags.
    pub(crate) const LEGACY_FORMAT_VERSION_WITHOUT_ID: u8 = 2;

    /// Makes a record with a fresh random id, the given expiry date and no values.
    ///
    /// # Panics
    ///
    /// Panics if the operating system cannot supply random bytes, as
    /// [`Id::default`] does.
    pub fn new(expiry_date: OffsetDateTime) -> Self {
        Self::with_id(Id::default(), expiry_date)
    }

    /// Puts together a record that a store kept in parts: its values are shared with
    /// the store, not copied.
    pub(crate) fn from_parts(
        id: Id,
        expiry_date: OffsetDateTime,
        version: u64,
        values: Option<Arc<[u8]>>,
    ) -> Self {
        Self {
            id,
            expiry_date,
            version,
            data: values.map_or_else(Data::default, Data::Shared),
        }
    }

    /// The values' bytes, shared (copied once into a shared allocation if this
    /// record owns them); `None` for no values. What [`from_parts`](Self::from_parts)
    /// takes back.
    pub(crate) fn shared_values(&self) -> Option<Arc<[u8]>> {
        // A clone shares whatever values there are.
        match self.data.clone() {
            Data::Shared(bytes) => Some(bytes),
            Data::Owned(_) => None,
        }
    }

    /// Makes a record with this id and expiry date, and no values.
    pub(crate) fn with_id(id: Id, expiry_date: OffsetDateTime) -> Self {
        Self {
            id,
            expiry_date,
            version: 0,
            data: Data::default(),
        }
    }

    /// Encodes `value` (its shape tag, then postcard) and stores it under `key`,
    /// replacing any value that was there.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Encode`] if `value` cannot be serialized; the record is then
    /// unchanged.
    pub fn insert<T: Serialize + ?Sized>(&mut self, key: impl AsRef<str>, value: &T) -> Result<()> {
        let tag = shape::tag_of(value)?;
        self.data
            .put(key.as_ref(), false, |bytes| {
                bytes.extend_from_slice(&tag);
                postcard::serialize_with_flavor(value, Append(bytes))
            })
            .map_err(Error::encode)?;
        Ok(())
    }

    /// Stores already-encoded bytes under `key` and returns the bytes it replaced:
    /// the stored form, a two-byte shape tag (`[0, 0]`: unchecked) then postcard,
    /// as [`get_raw`](Record::get_raw) gives it.
    pub fn insert_raw(&mut self, key: impl AsRef<str>, bytes: Vec<u8>) -> Option<Vec<u8>> {
        self.data.set(key.as_ref(), &bytes)
    }

    /// Decodes the value stored under `key` as a `T`.
    ///
    /// Returns `Ok(None)` when there is no such key.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Decode`] if the stored bytes are not a `T`: they do not
    /// decode as one, they hold a `T` followed by more bytes, or what they decode
    /// to has another shape than the value stored (see the type's docs). `T` is
    /// `Serialize` too, to hash the shape of what was read.
    pub fn get<T: DeserializeOwned + Serialize>(&self, key: &str) -> Result<Option<T>> {
        self.get_raw(key).map(decode_value).transpose()
    }

    /// Returns the bytes stored under `key`: its shape tag, then postcard.
    pub fn get_raw(&self, key: &str) -> Option<&[u8]> {
        self.data.get(key)
    }

    /// Removes the value stored under `key` and returns its encoded bytes.
    pub fn remove(&mut self, key: &str) -> Option<Vec<u8>> {
        self.data.remove(key)
    }

    /// Returns `true` if a value is stored under `key`.
    pub fn contains_key(&self, key: &str) -> bool {
        self.data.get(key).is_some()
    }

    /// Iterates over the keys, in sorted order.
    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        // Keys are checked to be UTF-8 when they come in, so none is skipped here.
        self.data
            .entries()
            .filter_map(|(key, _)| std::str::from_utf8(key).ok())
    }

    /// Returns how many values the record holds.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Returns `true` if the record holds no values.
    pub fn is_empty(&self) -> bool {
        self.data.bytes().is_empty()
    }

    /// Removes every value; the id and expiry date stay.
    pub fn clear(&mut self) {
        if !self.is_empty() {
            self.data = Data::default();
        }
    }

    /// Returns `true` if the record has expired at `now`.
    ///
    /// A record expires at its expiry date: from that instant on it no longer loads.
    pub fn is_expired_at(&self, now: OffsetDateTime) -> bool {
        self.expiry_date <= now
    }

    /// Encodes the whole record: a format-version byte
    /// ([`FORMAT_VERSION`](Record::FORMAT_VERSION)), the id, the expiry date in
    /// postcard, then the values.
    ///
    /// A store that files records under their id (or, better, a digest of it) should
    /// write [`encode_without_id`](Record::encode_without_id) instead: 16 bytes
    /// shorter, and a copy of the storage holds no id to replay.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Encode`] if the encoding would be longer than
    /// [`MAX_ENCODED_LEN`](Record::MAX_ENCODED_LEN), so that nothing is written that
    /// [`decode`](Record::decode) would refuse.
    pub fn encode(&self) -> Result<Vec<u8>> {
        self.encode_as(Some(self.id), &[])
    }

    /// Encodes the record without its id, for stores that know the id from where the
    /// record is filed: the format-version byte
    /// [`FORMAT_VERSION_WITHOUT_ID`](Record::FORMAT_VERSION_WITHOUT_ID), then the
    /// expiry date and values as in [`encode`](Record::encode). Read it back with
    /// [`decode_with_id`](Record::decode_with_id).
    ///
    /// # Errors
    ///
    /// As for [`encode`](Record::encode).
    ///
    /// # Examples
    ///
    /// ```
    /// use portable_sessions::session::Record;
    /// use time::OffsetDateTime;
    ///
    /// let mut record = Record::new(OffsetDateTime::UNIX_EPOCH);
    /// record.insert("user_id", &42u64).unwrap();
    /// let bytes = record.encode_without_id().unwrap();
    /// assert_eq!(bytes.len() + 16, record.encode().unwrap().len());
    /// assert_eq!(Record::decode_with_id(record.id, &bytes).unwrap(), record);
    /// assert!(Record::decode(&bytes).is_err()); // the other format is refused
    /// ```
    pub fn encode_without_id(&self) -> Result<Vec<u8>> {
        self.encode_as(None, &[])
    }

    /// [`encode_without_id`](Record::encode_without_id) after `prefix`, in one
    /// allocation: for stores that keep something (the version) in front of a record.
    #[cfg(any(feature = "redis", feature = "postgres", test))]
    pub(crate) fn encode_without_id_after(&self, prefix: &[u8]) -> Result<Vec<u8>> {
        self.encode_as(None, prefix)
    }

    fn encode_as(&self, id: Option<Id>, prefix: &[u8]) -> Result<Vec<u8>> {
        let mut head = [0u8; 1 + 16 + MAX_I128_VARINT_LEN];
        let mut head_len = 1;
        match id {
            Some(id) => {
                head[0] = Self::FORMAT_VERSION;
                head[1..17].copy_from_slice(&id.to_bytes());
                head_len += 16;
            }
            None => head[0] = Self::FORMAT_VERSION_WITHOUT_ID,
        }
        let expiry = postcard::to_slice(
            &self.expiry_date.unix_timestamp_nanos(),
            &mut head[head_len..],
        )
        .map_err(Error::encode)?;
        head_len += expiry.len();
        // No values is no bytes in memory, and a zero count on the wire.
        let values: &[u8] = if self.data.bytes().is_empty() {
            &[0]
        } else {
            self.data.bytes()
        };
        let len = head_len + values.len();
        if len > Self::MAX_ENCODED_LEN {
            return Err(Error::encode(format!(
                "encoded record is {len} bytes, more than the {} allowed",
                Self::MAX_ENCODED_LEN
            )));
        }
        let mut bytes = Vec::with_capacity(prefix.len() + len);
        bytes.extend_from_slice(prefix);
        bytes.extend_from_slice(&head[..head_len]);
        bytes.extend_from_slice(values);
        Ok(bytes)
    }

    /// Decodes a record written by [`encode`](Record::encode).
    ///
    /// The codec does not carry [`version`](Record::version): the record comes back
    /// at version 0, and a store sets the version it keeps beside the bytes.
    ///
    /// # Errors
    ///
    /// Returns [`Error::Decode`], and never panics, for any byte string that is not
    /// exactly one encoded record: empty or oversized input, an unknown format
    /// version (including the one of [`encode_without_id`](Record::encode_without_id)),
    /// truncated or corrupt bytes, a key that is not UTF-8, keys out of order or
    /// duplicated, an expiry date out of range, or trailing bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        Self::decode_as(bytes, None)
    }

    /// Decodes a record written by [`encode_without_id`](Record::encode_without_id),
    /// giving it the id it was filed under.
    ///
    /// # Errors
    ///
    /// As for [`decode`](Record::decode), with the formats swapped.
    pub fn decode_with_id(id: Id, bytes: &[u8]) -> Result<Self> {
        Self::decode_as(bytes, Some(id))
    }

    fn decode_as(bytes: &[u8], known_id: Option<Id>) -> Result<Self> {
        if bytes.len() > Self::MAX_ENCODED_LEN {
            return Err(Error::decode(format!(
                "encoded record is {} bytes, more than the {} allowed",
                bytes.len(),
                Self::MAX_ENCODED_LEN
            )));
        }
        let (expected, legacy) = match known_id {
            None => (Self::FORMAT_VERSION, Self::LEGACY_FORMAT_VERSION),
            Some(_) => (
                Self::FORMAT_VERSION_WITHOUT_ID,
                Self::LEGACY_FORMAT_VERSION_WITHOUT_ID,
            ),
        };
        let Some((&version, mut rest)) = bytes.split_first() else {
            return Err(Error::decode("encoded record is empty"));
        };
        if version != expected && version != legacy {
            return Err(Error::decode(format!(
                "record format version {version} where {expected} was expected"
            )));
        }
        let id = match known_id {
            Some(id) => id,
            None => {
                let (id, after) = rest
                    .split_first_chunk::<16>()
                    .ok_or_else(|| Error::decode("encoded record ends inside its id"))?;
                rest = after;
                Id::from_bytes(*id)
            }
        };
        let (expiry_nanos, values) =
            postcard::take_from_bytes::<i128>(rest).map_err(Error::decode)?;
        let expiry_date =
            OffsetDateTime::from_unix_timestamp_nanos(expiry_nanos).map_err(Error::decode)?;
        let data = if version == legacy {
            Data::decode_untagged(values)?
        } else {
            Data::decode(values)?
        };
        Ok(Self {
            id,
            expiry_date,
            version: 0,
            data,
        })
    }
}

/// The longest postcard varint of an `i128`.
const MAX_I128_VARINT_LEN: usize = 19;

fn decode_value<T: DeserializeOwned + Serialize>(bytes: &[u8]) -> Result<T> {
    let (tag, bytes) = bytes
        .split_first_chunk::<{ shape::TAG_LEN }>()
        .ok_or_else(|| Error::decode("the stored value is shorter than its shape tag"))?;
    let (value, rest) = postcard::take_from_bytes(bytes).map_err(Error::decode)?;
    if !rest.is_empty() {
        return Err(Error::decode(format!(
            "{} bytes left over after decoding the value: it was stored as another type",
            rest.len()
        )));
    }
    if *tag != shape::UNCHECKED && shape::tag_of(&value)? != *tag {
        return Err(Error::decode(format!(
            "the value was stored as another type than {} (its shape differs)",
            std::any::type_name::<T>()
        )));
    }
    Ok(value)
}

impl fmt::Debug for Record {
    /// Prints the id (abridged), the expiry date and the keys, never the values:
    /// they may hold credentials.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("id", &self.id)
            .field("expiry_date", &self.expiry_date)
            .field("version", &self.version)
            .field("keys", &self.keys().collect::<Vec<_>>())
            .finish()
    }
}

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
enum Data {
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
struct Append<'a>(&'a mut Vec<u8>);

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
    fn decode(bytes: &[u8]) -> Result<Self> {
        Self::check(bytes)?;
        Ok(if bytes.first() == Some(&0) {
            Self::default()
        } else {
            Self::Shared(Arc::from(bytes))
        })
    }

    /// Decodes values written before they had shape tags, giving each the tag
    /// that is never checked.
    fn decode_untagged(bytes: &[u8]) -> Result<Self> {
        Self::check(bytes)?;
        let mut data = Self::default();
        let mut rest = bytes;
        let count = take_varint(&mut rest).unwrap_or(0);
        for _ in 0..count {
            // Checked above, so the fields are all there.
            let (Some(key), Some(value)) = (take_field(&mut rest), take_field(&mut rest)) else {
                break;
            };
            let key = std::str::from_utf8(key).map_err(Error::decode)?;
            let put = data.put(key, false, |bytes| {
                bytes.extend_from_slice(&shape::UNCHECKED);
                bytes.extend_from_slice(value);
                Ok::<(), std::convert::Infallible>(())
            });
            if let Err(never) = put {
                match never {}
            }
        }
        Ok(data)
    }

    /// Checks that `bytes` are exactly one encoded set of values, keys in order. A
    /// value too short for a shape tag is kept: reading it typed is the error.
    fn check(bytes: &[u8]) -> Result<()> {
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

    fn bytes(&self) -> &[u8] {
        match self {
            Self::Shared(bytes) => bytes,
            Self::Owned(bytes) => bytes,
        }
    }

    /// The bytes, to change: copied out first if they are shared.
    fn bytes_mut(&mut self) -> &mut Vec<u8> {
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

    fn len(&self) -> usize {
        take_varint(&mut self.bytes()).unwrap_or(0)
    }

    /// Iterates over `(key, value)`, in key order.
    fn entries(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        let mut rest = self.bytes();
        let count = take_varint(&mut rest).unwrap_or(0);
        // Checked when made, so the fields never run out before the count does.
        (0..count).map_while(move |_| Some((take_field(&mut rest)?, take_field(&mut rest)?)))
    }

    fn get(&self, key: &str) -> Option<&[u8]> {
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
    fn put<E>(
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
    fn set(&mut self, key: &str, value: &[u8]) -> Option<Vec<u8>> {
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
    fn remove(&mut self, key: &str) -> Option<Vec<u8>> {
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
fn take_varint(bytes: &mut &[u8]) -> Option<usize> {
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
fn take_field<'a>(bytes: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = take_varint(bytes)?;
    let (field, rest) = bytes.split_at_checked(len)?;
    *bytes = rest;
    Some(field)
}

fn put_varint(bytes: &mut Vec<u8>, mut value: usize) {
    while value >= 0x80 {
        bytes.push(value as u8 | 0x80);
        value >>= 7;
    }
    bytes.push(value as u8);
}

fn put_field(bytes: &mut Vec<u8>, field: &[u8]) {
    put_varint(bytes, field.len());
    bytes.extend_from_slice(field);
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    thread_local! {
        /// Makes this thread's next draws of [`random_id`] fail, as a broken OS
        /// random source would.
        pub(crate) static RNG_FAILS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    #[test]
    fn text_form_matches_base64url_of_le_bytes() {
        // All-zero and all-one ids, and one whose bytes count up.
        assert_eq!(
            Id::from_bytes([0; 16]).to_string(),
            "AAAAAAAAAAAAAAAAAAAAAA"
        );
        assert_eq!(
            Id::from_bytes([0xff; 16]).to_string(),
            "_____________________w"
        );
        let counting = Id::from_bytes(core::array::from_fn(|i| i as u8));
        assert_eq!(counting.to_string(), "AAECAwQFBgcICQoLDA0ODw");
        assert_eq!("AAECAwQFBgcICQoLDA0ODw".parse::<Id>().unwrap(), counting);
    }

    #[test]
    fn non_canonical_last_character_is_rejected() {
        // 'x' is 49: its low four bits are set.
        let err = "_____________________x".parse::<Id>().unwrap_err();
        assert_eq!(err.kind, ParseIdErrorKind::TrailingBits);
    }

    #[test]
    fn padding_and_other_alphabets_are_rejected() {
        assert!("AAECAwQFBgcICQoLDA0ODw==".parse::<Id>().is_err());
        assert!("AAECAwQFBgcICQoLDA0OD+".parse::<Id>().is_err());
        assert!("AAECAwQFBgcICQoLDA0OD/".parse::<Id>().is_err());
        assert!("".parse::<Id>().is_err());
        // 22 bytes, but not 22 ASCII characters.
        assert!("AAECAwQFBgcICQoLDA0é".parse::<Id>().is_err());
    }

    #[test]
    fn debug_hides_most_of_the_id() {
        let id = Id::default();
        let debug = format!("{id:?}");
        assert!(!debug.contains(&id.to_string()));
        assert!(debug.contains(&id.to_string()[..4]));
    }

    #[test]
    fn version_byte_leads_the_encoding() {
        let record = Record::new(OffsetDateTime::UNIX_EPOCH);
        assert_eq!(record.encode().unwrap()[0], Record::FORMAT_VERSION);
    }

    /// The issue's cases: postcard alone read `4u64` as `2i64` and an empty list as
    /// `0u64`; the shape tag makes both an error.
    #[test]
    fn a_value_read_as_another_type_is_an_error() {
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct Cart {
            items: Vec<String>,
            total: u64,
        }
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct Swapped {
            total: u64,
            items: Vec<String>,
        }
        let mut record = Record::new(OffsetDateTime::UNIX_EPOCH);
        record.insert("n", &4u64).unwrap();
        record.insert("list", &Vec::<String>::new()).unwrap();
        record.insert("flag", &true).unwrap();
        let cart = Cart {
            items: vec!["apple".into()],
            total: 3,
        };
        record.insert("cart", &cart).unwrap();
        let decode = |err: Error| assert!(matches!(err, Error::Decode(_)), "{err:?}");
        decode(record.get::<i64>("n").unwrap_err());
        decode(record.get::<u64>("list").unwrap_err());
        decode(record.get::<u8>("flag").unwrap_err());
        decode(record.get::<(Vec<String>, u64)>("cart").unwrap_err());
        decode(record.get::<Swapped>("cart").unwrap_err());
        // The right types, and the ones postcard reads alike, still read.
        assert_eq!(record.get::<u64>("n").unwrap(), Some(4));
        assert_eq!(record.get::<u32>("n").unwrap(), Some(4));
        assert_eq!(record.get::<Vec<u64>>("list").unwrap(), Some(vec![]));
        assert_eq!(record.get::<Cart>("cart").unwrap(), Some(cart));
        // A survivor of the encoding: the tag travels with the record.
        let decoded = Record::decode(&record.encode().unwrap()).unwrap();
        decode(decoded.get::<i64>("n").unwrap_err());
        // Too short for a tag: an error on read, and the record still encodes.
        record.insert_raw("short", vec![1]);
        decode(record.get::<u8>("short").unwrap_err());
        assert!(Record::decode(&record.encode().unwrap()).is_ok());
    }

    /// Records written before values had tags (formats 1 and 2) still decode, and
    /// their values read unchecked, as they always did.
    #[test]
    fn records_from_before_shape_tags_read_unchecked() {
        let untagged = |version: u8, with_id: Option<Id>| {
            let mut bytes = vec![version];
            if let Some(id) = with_id {
                bytes.extend_from_slice(&id.to_bytes());
            }
            bytes.extend(postcard::to_allocvec(&0i128).unwrap());
            bytes.push(2); // two values, in key order
            for (key, value) in [("a", postcard::to_allocvec(&4u64).unwrap()), ("b", vec![])] {
                put_field(&mut bytes, key.as_bytes());
                put_field(&mut bytes, &value);
            }
            bytes
        };
        let id = Id::default();
        for record in [
            Record::decode(&untagged(Record::LEGACY_FORMAT_VERSION, Some(id))).unwrap(),
            Record::decode_with_id(
                id,
                &untagged(Record::LEGACY_FORMAT_VERSION_WITHOUT_ID, None),
            )
            .unwrap(),
        ] {
            assert_eq!(record.id, id);
            assert_eq!(record.get::<u64>("a").unwrap(), Some(4));
            assert_eq!(
                record.get::<i64>("a").unwrap(),
                Some(2),
                "unchecked, as before"
            );
            assert_eq!(record.get_raw("b"), Some(&shape::UNCHECKED[..]));
            // Written again, it is in the current format and reads back the same.
            let again = Record::decode(&record.encode().unwrap()).unwrap();
            assert_eq!(again, record);
        }
    }

    #[test]
    fn clones_share_values_until_changed() {
        let mut a = Record::new(OffsetDateTime::UNIX_EPOCH);
        a.insert("k", "v").unwrap();
        let b = a.clone();
        let c = b.clone();
        let (Data::Shared(b_bytes), Data::Shared(c_bytes)) = (&b.data, &c.data) else {
            panic!("clones share their values");
        };
        assert!(Arc::ptr_eq(b_bytes, c_bytes));
        let mut b = b;
        b.insert("k", "w").unwrap();
        assert_eq!(a.get::<String>("k").unwrap().as_deref(), Some("v"));
        assert_eq!(b.get::<String>("k").unwrap().as_deref(), Some("w"));
    }

    #[test]
    fn values_stay_sorted_and_equal_values_are_equal_bytes() {
        let mut a = Record::new(OffsetDateTime::UNIX_EPOCH);
        let mut b = a.clone();
        for key in ["m", "a", "z", "b"] {
            a.insert(key, key).unwrap();
        }
        for key in ["z", "b", "m", "a", "q"] {
            b.insert(key, key).unwrap();
        }
        assert_eq!(b.remove("q"), Some(encode_value("q").unwrap()));
        assert_eq!(b.remove("q"), None);
        assert_eq!(a.keys().collect::<Vec<_>>(), ["a", "b", "m", "z"]);
        assert_eq!(a, b);
        assert_eq!(a.encode().unwrap(), b.encode().unwrap());
        assert_eq!(a.insert_raw("b", vec![9]), Some(encode_value("b").unwrap()));
        assert_eq!(a.get_raw("b"), Some(&[9u8][..]));
        assert_eq!(a.len(), 4);
        for key in ["a", "b", "m", "z"] {
            a.remove(key);
        }
        assert!(a.is_empty());
        assert_eq!(
            a,
            Record {
                data: Data::default(),
                ..a.clone()
            }
        );
        assert_eq!(Record::decode(&a.encode().unwrap()).unwrap(), a);
    }

    #[test]
    fn unordered_keys_and_overlong_lengths_are_rejected() {
        let head = |count: u8| {
            let mut bytes = vec![Record::FORMAT_VERSION];
            bytes.extend([0u8; 16]); // id
            bytes.push(0); // expiry
            bytes.push(count);
            bytes
        };
        let mut unordered = head(2);
        unordered.extend([1, b'b', 1, 7, 1, b'a', 1, 7]);
        let err = Record::decode(&unordered).unwrap_err();
        assert!(err.report().contains("out of order"), "{}", err.report());

        let mut overlong = head(1);
        overlong.extend([0x81, 0x00, b'k', 1, 7]); // key length 1, written in two bytes
        assert!(matches!(Record::decode(&overlong), Err(Error::Decode(_))));

        let mut not_utf8 = head(1);
        not_utf8.extend([1, 0xff, 1, 7]);
        assert!(matches!(Record::decode(&not_utf8), Err(Error::Decode(_))));

        let mut fine = head(1);
        fine.extend([1, b'k', 1, 7]);
        assert_eq!(
            Record::decode(&fine).unwrap().get_raw("k"),
            Some(&[7u8][..])
        );
    }

    /// One change to a record, for the model test below.
    #[derive(Debug, Clone)]
    enum Change {
        Insert(String, String),
        InsertRaw(String, Vec<u8>),
        Remove(String),
        Clear,
        /// Keeps a clone, which later changes must leave alone.
        Clone,
    }

    fn any_change() -> impl proptest::strategy::Strategy<Value = Change> {
        use proptest::prelude::*;
        // Few distinct short keys (so that they collide), and some long ones whose
        // lengths take two varint bytes.
        let key = prop_oneof![4 => "[a-e]{1,2}", 1 => "[a-c]{130,140}"];
        prop_oneof![
            4 => (key.clone(), "[a-z]{0,20}").prop_map(|(k, v)| Change::Insert(k, v)),
            2 => (key.clone(), proptest::collection::vec(any::<u8>(), 0..200))
                .prop_map(|(k, v)| Change::InsertRaw(k, v)),
            2 => key.prop_map(Change::Remove),
            1 => Just(Change::Clear),
            1 => Just(Change::Clone),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(500))]

        /// Records edited in place hold exactly what a sorted map would, encode as
        /// one built from scratch would, and never change a clone.
        #[test]
        fn edits_in_place_match_a_sorted_map(changes in proptest::collection::vec(any_change(), 0..60)) {
            use std::collections::BTreeMap;
            let mut record = Record::new(OffsetDateTime::UNIX_EPOCH);
            let mut model: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            let mut clones: Vec<(Record, BTreeMap<String, Vec<u8>>)> = Vec::new();
            for change in changes {
                match change {
                    Change::Insert(key, value) => {
                        record.insert(&key, &value).unwrap();
                        model.insert(key, encode_value(&value).unwrap());
                    }
                    Change::InsertRaw(key, value) => {
                        let old = record.insert_raw(&key, value.clone());
                        proptest::prop_assert_eq!(old, model.insert(key, value));
                    }
                    Change::Remove(key) => {
                        proptest::prop_assert_eq!(record.remove(&key), model.remove(&key));
                    }
                    Change::Clear => {
                        record.clear();
                        model.clear();
                    }
                    Change::Clone => clones.push((record.clone(), model.clone())),
                }
                proptest::prop_assert_eq!(record.len(), model.len());
                proptest::prop_assert!(record.keys().eq(model.keys().map(String::as_str)));
                for (key, value) in &model {
                    proptest::prop_assert_eq!(record.get_raw(key), Some(&value[..]));
                }
                // The same values, inserted into a fresh record in key order.
                let mut fresh = Record::with_id(record.id, record.expiry_date);
                for (key, value) in &model {
                    fresh.insert_raw(key, value.clone());
                }
                proptest::prop_assert_eq!(&record, &fresh);
                proptest::prop_assert_eq!(record.encode().unwrap(), fresh.encode().unwrap());
                proptest::prop_assert_eq!(Record::decode(&record.encode().unwrap()).unwrap(), fresh);
            }
            for (clone, model) in clones {
                proptest::prop_assert!(clone.keys().eq(model.keys().map(String::as_str)));
                for (key, value) in &model {
                    proptest::prop_assert_eq!(clone.get_raw(key), Some(&value[..]));
                }
            }
        }
    }

    #[test]
    fn counts_past_127_values_and_back() {
        let mut record = Record::new(OffsetDateTime::UNIX_EPOCH);
        let keys: Vec<String> = (0..200).map(|i| format!("k{:03}", (i * 7) % 200)).collect();
        for (i, key) in keys.iter().enumerate() {
            record.insert(key, &i).unwrap();
            assert_eq!(record.len(), i + 1);
            let bytes = record.encode().unwrap();
            assert_eq!(Record::decode(&bytes).unwrap(), record);
        }
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(record.get::<usize>(key).unwrap(), Some(i));
        }
        for (i, key) in keys.iter().enumerate() {
            assert!(record.remove(key).is_some());
            assert_eq!(record.len(), 199 - i);
            assert_eq!(Record::decode(&record.encode().unwrap()).unwrap(), record);
        }
        assert_eq!(record, Record::with_id(record.id, record.expiry_date));
    }

    /// A value whose encoding writes part of a sequence, then fails (or panics).
    struct HalfWritten {
        panics: bool,
    }

    impl Serialize for HalfWritten {
        fn serialize<S: serde::Serializer>(
            &self,
            serializer: S,
        ) -> std::result::Result<S::Ok, S::Error> {
            use serde::ser::{Error as _, SerializeSeq};
            let mut seq = serializer.serialize_seq(Some(3))?;
            seq.serialize_element(&1u32)?;
            if self.panics {
                panic!("a Serialize that panics");
            }
            Err(S::Error::custom("no"))
        }
    }

    #[test]
    fn a_value_that_panics_while_encoding_changes_nothing() {
        for start in [&[][..], &["a", "z"][..]] {
            let mut record = Record::new(OffsetDateTime::UNIX_EPOCH);
            for key in start {
                record.insert(key, &1u8).unwrap();
            }
            let before = record.clone();
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let _ = record.insert("m", &HalfWritten { panics: true });
            }));
            assert!(caught.is_err());
            assert_eq!(record, before);
            assert_eq!(record.encode().unwrap(), before.encode().unwrap());
            assert_eq!(Record::decode(&record.encode().unwrap()).unwrap(), before);
        }
    }

    #[test]
    fn a_value_that_fails_to_encode_changes_nothing() {
        const FAILS: HalfWritten = HalfWritten { panics: false };
        let mut record = Record::new(OffsetDateTime::UNIX_EPOCH);
        assert!(record.insert("k", &FAILS).is_err());
        assert_eq!(record, Record::with_id(record.id, record.expiry_date));
        assert!(record.is_empty());
        record.insert("a", &1u8).unwrap();
        let before = record.clone();
        assert!(matches!(record.insert("b", &FAILS), Err(Error::Encode(_))));
        assert!(matches!(record.insert("a", &FAILS), Err(Error::Encode(_))));
        assert_eq!(record, before);
        assert_eq!(record.encode().unwrap(), before.encode().unwrap());
    }
}
