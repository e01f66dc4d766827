//! [`Record`]: what a store keeps for one session, and its codec's framing (format
//! version, id, expiry date) around the values.

use std::{fmt, sync::Arc};

use serde::{de::DeserializeOwned, Serialize};
use time::OffsetDateTime;

use crate::{
    session::{
        codec::{Append, Data},
        shape, Id, Owner, Ownership,
    },
    session_store::{Error, Result},
};

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
    /// The session's owner, when it has one, with when it got it and when it was last
    /// written: stores that keep an owner index
    /// ([`SessionStore::supports_owners`](crate::SessionStore::supports_owners)) file
    /// the record under it, in the same write. The record codec carries it.
    pub ownership: Option<Ownership>,
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

    /// The format version of [`encode`](Record::encode)'s output for a record with an
    /// [`ownership`](Record::ownership): after the expiry date, the owner, when it
    /// got it and when it was last written. Records without one keep
    /// [`FORMAT_VERSION`](Record::FORMAT_VERSION), byte for byte.
    pub const FORMAT_VERSION_OWNED: u8 = 5;

    /// [`FORMAT_VERSION_OWNED`](Record::FORMAT_VERSION_OWNED) without the id, for
    /// [`encode_without_id`](Record::encode_without_id).
    pub const FORMAT_VERSION_OWNED_WITHOUT_ID: u8 = 6;

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
            ownership: None,
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
            ownership: None,
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
        let owned = self.ownership.is_some();
        match id {
            Some(id) => {
                head[0] = if owned {
                    Self::FORMAT_VERSION_OWNED
                } else {
                    Self::FORMAT_VERSION
                };
                head[1..17].copy_from_slice(&id.to_bytes());
                head_len += 16;
            }
            None if owned => head[0] = Self::FORMAT_VERSION_OWNED_WITHOUT_ID,
            None => head[0] = Self::FORMAT_VERSION_WITHOUT_ID,
        }
        let expiry = postcard::to_slice(
            &self.expiry_date.unix_timestamp_nanos(),
            &mut head[head_len..],
        )
        .map_err(Error::encode)?;
        head_len += expiry.len();
        // The ownership, when there is one: the owner, then its two dates.
        let ownership = match &self.ownership {
            None => Vec::new(),
            Some(ownership) => postcard::to_allocvec(&(
                ownership.owner.as_str(),
                ownership.created_at.unix_timestamp_nanos(),
                ownership.written_at.unix_timestamp_nanos(),
            ))
            .map_err(Error::encode)?,
        };
        head_len += ownership.len();
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
        bytes.extend_from_slice(&head[..head_len - ownership.len()]);
        bytes.extend_from_slice(&ownership);
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

    /// The ownership of a record written by
    /// [`encode_without_id`](Record::encode_without_id), read from the first bytes
    /// of its encoding alone ([`OWNERSHIP_PREFIX_LEN`](Self::OWNERSHIP_PREFIX_LEN)
    /// are always enough): for a store that ranks an owner's sessions without
    /// reading their values. `None` for a record without an owner.
    #[cfg(feature = "postgres")]
    pub(crate) fn peek_ownership(bytes: &[u8]) -> Result<Option<Ownership>> {
        let Some((&version, rest)) = bytes.split_first() else {
            return Err(Error::decode("encoded record is empty"));
        };
        if version != Self::FORMAT_VERSION_OWNED_WITHOUT_ID {
            return Ok(None);
        }
        let (_, rest) = postcard::take_from_bytes::<i128>(rest).map_err(Error::decode)?;
        Ok(Some(take_ownership(rest)?.0))
    }

    /// How many bytes of an owned record's encoding
    /// [`peek_ownership`](Self::peek_ownership) needs at most: the format byte, the
    /// expiry date, the longest owner and its two dates.
    #[cfg(feature = "postgres")]
    pub(crate) const OWNERSHIP_PREFIX_LEN: usize =
        1 + MAX_I128_VARINT_LEN + 2 + Owner::MAX_LEN + 2 * MAX_I128_VARINT_LEN;

    fn decode_as(bytes: &[u8], known_id: Option<Id>) -> Result<Self> {
        if bytes.len() > Self::MAX_ENCODED_LEN {
            return Err(Error::decode(format!(
                "encoded record is {} bytes, more than the {} allowed",
                bytes.len(),
                Self::MAX_ENCODED_LEN
            )));
        }
        let (expected, legacy, owned) = match known_id {
            None => (
                Self::FORMAT_VERSION,
                Self::LEGACY_FORMAT_VERSION,
                Self::FORMAT_VERSION_OWNED,
            ),
            Some(_) => (
                Self::FORMAT_VERSION_WITHOUT_ID,
                Self::LEGACY_FORMAT_VERSION_WITHOUT_ID,
                Self::FORMAT_VERSION_OWNED_WITHOUT_ID,
            ),
        };
        let Some((&version, mut rest)) = bytes.split_first() else {
            return Err(Error::decode("encoded record is empty"));
        };
        if version != expected && version != legacy && version != owned {
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
        let (expiry_nanos, mut values) =
            postcard::take_from_bytes::<i128>(rest).map_err(Error::decode)?;
        let expiry_date =
            OffsetDateTime::from_unix_timestamp_nanos(expiry_nanos).map_err(Error::decode)?;
        let mut ownership = None;
        if version == owned {
            let (read, after) = take_ownership(values)?;
            values = after;
            ownership = Some(read);
        }
        let data = if version == legacy {
            Data::decode_untagged(values)?
        } else {
            Data::decode(values)?
        };
        Ok(Self {
            id,
            expiry_date,
            version: 0,
            ownership,
            data,
        })
    }
}

/// Reads the ownership that an owned record's encoding carries after its expiry
/// date (the owner, then its two dates); returns it and the bytes after it.
fn take_ownership(bytes: &[u8]) -> Result<(Ownership, &[u8])> {
    let ((owner, created, written), rest) =
        postcard::take_from_bytes::<(&str, i128, i128)>(bytes).map_err(Error::decode)?;
    let date = |nanos| OffsetDateTime::from_unix_timestamp_nanos(nanos).map_err(Error::decode);
    let ownership = Ownership {
        owner: Owner::new(owner).map_err(|err| Error::decode(err.report()))?,
        created_at: date(created)?,
        written_at: date(written)?,
    };
    Ok((ownership, rest))
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
            .field("owner", &self.ownership.as_ref().map(|o| &o.owner))
            .field("keys", &self.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;
    use crate::session::{codec::*, encode_value, shape};

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

    #[cfg(feature = "postgres")]
    #[test]
    fn the_ownership_reads_from_the_front_of_the_encoding() {
        use crate::session::{Owner, Ownership};
        let mut record = Record::new(OffsetDateTime::now_utc());
        record.insert("big", &vec![7u8; 5000]).unwrap();
        assert_eq!(
            Record::peek_ownership(&record.encode_without_id().unwrap()).unwrap(),
            None
        );
        let owner = Owner::new("x".repeat(Owner::MAX_LEN)).unwrap();
        record.ownership = Some(Ownership::new(owner, OffsetDateTime::UNIX_EPOCH));
        let bytes = record.encode_without_id().unwrap();
        let front = &bytes[..Record::OWNERSHIP_PREFIX_LEN];
        assert_eq!(Record::peek_ownership(front).unwrap(), record.ownership);
        assert!(
            Record::peek_ownership(&bytes[..40]).is_err(),
            "cut inside the owner"
        );
        assert!(Record::peek_ownership(&[]).is_err());
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
