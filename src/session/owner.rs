//! A session's owner (the user it belongs to), and what the stores give and take to
//! list and end an owner's sessions: [`Owner`], [`Ownership`], [`Handle`],
//! [`OwnedSession`] and [`Ending`].

use std::{fmt, str::FromStr, sync::Arc};

use serde::{de::DeserializeOwned, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::{
    session::{Id, Record},
    session_store::{Error, Result},
};

/// The user a session belongs to: a name the application chooses (a user id, an
/// account number), 1 to [`MAX_LEN`](Owner::MAX_LEN) bytes of UTF-8 without control
/// characters.
///
/// Stores keep it beside the record and index it, so that an owner's sessions can be
/// listed and ended without a scan of every session. A name of up to 22 bytes is
/// kept inline (cloning it is a copy, with no allocation and no reference count to
/// touch); a longer one is shared (cloning it is a reference count).
///
/// ```
/// use portable_sessions::session::Owner;
///
/// let owner = Owner::new("user-42").unwrap();
/// assert_eq!(owner.as_str(), "user-42");
/// assert!(Owner::new("").is_err());
/// assert!(Owner::new("a\nb").is_err());
/// ```
#[derive(Clone)]
pub struct Owner(Repr);

/// How many bytes of a name an [`Owner`] keeps inline.
const INLINE: usize = 22;

#[derive(Clone)]
enum Repr {
    Inline { len: u8, bytes: [u8; INLINE] },
    Shared(Arc<str>),
}

impl PartialEq for Owner {
    fn eq(&self, other: &Self) -> bool {
        self.bytes() == other.bytes()
    }
}

impl Eq for Owner {}

impl std::hash::Hash for Owner {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.bytes().hash(state);
    }
}

impl PartialOrd for Owner {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Owner {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.bytes().cmp(other.bytes())
    }
}

impl Owner {
    /// The longest owner name, in bytes.
    pub const MAX_LEN: usize = 256;

    /// Checks `name` and makes it an owner.
    ///
    /// # Errors
    ///
    /// [`Error::Encode`] when the name is empty, longer than
    /// [`MAX_LEN`](Owner::MAX_LEN) bytes, or holds a control character.
    pub fn new(name: impl AsRef<str>) -> Result<Self> {
        let name = name.as_ref();
        if name.is_empty() {
            return Err(Error::encode("a session owner's name is empty"));
        }
        if name.len() > Self::MAX_LEN {
            return Err(Error::encode(format!(
                "a session owner's name is {} bytes, more than the {} allowed",
                name.len(),
                Self::MAX_LEN
            )));
        }
        if name.chars().any(char::is_control) {
            return Err(Error::encode(
                "a session owner's name holds a control character",
            ));
        }
        if name.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..name.len()].copy_from_slice(name.as_bytes());
            // At most 22: fits.
            let len = name.len() as u8;
            return Ok(Self(Repr::Inline { len, bytes }));
        }
        Ok(Self(Repr::Shared(name.into())))
    }

    /// The owner's name.
    pub fn as_str(&self) -> &str {
        match &self.0 {
            // Checked to be UTF-8 when it was made: never the empty fallback.
            Repr::Inline { .. } => std::str::from_utf8(self.bytes()).unwrap_or_default(),
            Repr::Shared(name) => name,
        }
    }

    /// `true` when both are the very same shared name: a cheap test of equality
    /// that touches neither name's bytes (`false` says nothing).
    pub(crate) fn same_as(&self, other: &Self) -> bool {
        match (&self.0, &other.0) {
            (Repr::Shared(a), Repr::Shared(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    fn bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Repr::Shared(name) => name.as_bytes(),
        }
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl FromStr for Owner {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

impl TryFrom<&str> for Owner {
    type Error = Error;

    fn try_from(s: &str) -> Result<Self> {
        Self::new(s)
    }
}

impl TryFrom<String> for Owner {
    type Error = Error;

    fn try_from(s: String) -> Result<Self> {
        Self::new(s)
    }
}

/// Who owns a session, since when, and when it was last written: what a record
/// carries once its session has an owner ([`Record::ownership`]).
///
/// [`Session`](crate::session::Session) sets it: `created_at` when the owner is set
/// (a login), `written_at` at each write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    /// The user the session belongs to.
    pub owner: Owner,
    /// When the session got this owner.
    pub created_at: OffsetDateTime,
    /// When the session was last written.
    pub written_at: OffsetDateTime,
}

impl Ownership {
    /// `owner`'s, created and written at `now`.
    pub fn new(owner: Owner, now: OffsetDateTime) -> Self {
        Self {
            owner,
            created_at: now,
            written_at: now,
        }
    }
}

/// An opaque name for one session in an owner's listing: what a page shows and a
/// form posts back to end that session, never the session's id (a credential that
/// stays in its cookie).
///
/// It is the SHA-256 digest of the id, in 64 lowercase hexadecimal characters:
/// stable for the session's life (until [`cycle_id`](crate::session::Session::cycle_id)
/// gives it a new id), the same in every process sharing a store, and no help in
/// finding the id.
///
/// ```
/// use portable_sessions::session::{Handle, Id};
///
/// let handle = Handle::of(&Id::default());
/// let text = handle.to_string();
/// assert_eq!(text.len(), 64);
/// assert_eq!(text.parse::<Handle>().unwrap(), handle);
/// assert!("not a handle".parse::<Handle>().is_err());
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Handle([u8; 32]);

impl Handle {
    /// The handle of the session with this id.
    pub fn of(id: &Id) -> Self {
        Self(Sha256::digest(id.to_bytes()).into())
    }

    /// Makes a handle from its 32 bytes (as a store keeps them).
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The handle's 32 bytes.
    pub const fn to_bytes(self) -> [u8; 32] {
        self.0
    }
}

impl fmt::Display for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Handle({self})")
    }
}

/// The error for text that is not a [`Handle`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid session handle: expected 64 lowercase hexadecimal characters")]
pub struct ParseHandleError;

impl FromStr for Handle {
    type Err = ParseHandleError;

    fn from_str(s: &str) -> std::result::Result<Self, ParseHandleError> {
        let text = s.as_bytes();
        if text.len() != 64 {
            return Err(ParseHandleError);
        }
        let digit = |c: u8| match c {
            b'0'..=b'9' => Ok(c - b'0'),
            b'a'..=b'f' => Ok(c - b'a' + 10),
            _ => Err(ParseHandleError),
        };
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(text.chunks_exact(2)) {
            *byte = digit(pair[0])? << 4 | digit(pair[1])?;
        }
        Ok(Self(bytes))
    }
}

/// One live session in an owner's listing
/// ([`SessionStore::list_owned`](crate::SessionStore::list_owned)).
///
/// It gives the session's [`Handle`], its dates and its values, never its id.
#[derive(Clone)]
pub struct OwnedSession {
    handle: Handle,
    ownership: Ownership,
    expiry_date: OffsetDateTime,
    values: Record,
    current: bool,
}

impl OwnedSession {
    /// The listing's entry for `record`, found under `handle`: a store calls this
    /// with each live record of the owner. The record's id is not kept.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] when the record has no owner.
    pub fn new(handle: Handle, record: Record) -> Result<Self> {
        let Some(ownership) = record.ownership.clone() else {
            return Err(Error::decode(
                "a record listed for an owner carries no owner",
            ));
        };
        let mut values = record;
        values.id = Id::from_bytes([0; 16]);
        values.ownership = None;
        Ok(Self {
            handle,
            expiry_date: values.expiry_date,
            ownership,
            values,
            current: false,
        })
    }

    /// The session's handle: pass it to end this session.
    pub fn handle(&self) -> Handle {
        self.handle
    }

    /// The owner.
    pub fn owner(&self) -> &Owner {
        &self.ownership.owner
    }

    /// When the session got its owner (the login).
    pub fn created_at(&self) -> OffsetDateTime {
        self.ownership.created_at
    }

    /// When the session was last written.
    pub fn written_at(&self) -> OffsetDateTime {
        self.ownership.written_at
    }

    /// When the session expires.
    pub fn expiry_date(&self) -> OffsetDateTime {
        self.expiry_date
    }

    /// `true` for the session of the request that listed it
    /// ([`Session::owner_sessions`](crate::session::Session::owner_sessions));
    /// always `false` in a store's own listing.
    pub fn is_current(&self) -> bool {
        self.current
    }

    pub(crate) fn mark_current(&mut self, current: bool) {
        self.current = current;
    }

    /// A value the application stored in the session (a device name, say), decoded
    /// as a `T`, as [`Record::get`] does.
    ///
    /// # Errors
    ///
    /// [`Error::Decode`] when the value is not a `T`.
    pub fn get<T: DeserializeOwned + Serialize>(&self, key: &str) -> Result<Option<T>> {
        if crate::session::expiry::is_reserved(key) {
            return Ok(None);
        }
        self.values.get(key)
    }
}

impl fmt::Debug for OwnedSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OwnedSession")
            .field("handle", &self.handle)
            .field("owner", &self.ownership.owner)
            .field("created_at", &self.ownership.created_at)
            .field("written_at", &self.ownership.written_at)
            .field("expiry_date", &self.expiry_date)
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

/// Which of an owner's sessions
/// [`SessionStore::end_owned`](crate::SessionStore::end_owned) ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The one with this handle, if the owner has it.
    One(Handle),
    /// All but the one with this handle ("log out the other devices").
    AllBut(Handle),
    /// All of them ("log out everywhere").
    All,
    /// All but the `n` most recently created (by [`Ownership::created_at`]; the
    /// later handle first among equals): a limit of `n` sessions per owner.
    AllButNewest(usize),
}

impl Ending {
    /// Of `owned` (each session's handle and creation date), the handles this ending
    /// ends: for stores that list, then pick.
    pub fn pick(self, mut owned: Vec<(Handle, OffsetDateTime)>) -> Vec<Handle> {
        match self {
            Self::One(handle) => owned
                .into_iter()
                .filter(|(h, _)| *h == handle)
                .map(|(h, _)| h)
                .collect(),
            Self::AllBut(handle) => owned
                .into_iter()
                .filter(|(h, _)| *h != handle)
                .map(|(h, _)| h)
                .collect(),
            Self::All => owned.into_iter().map(|(h, _)| h).collect(),
            Self::AllButNewest(n) => {
                owned.sort_by(|a, b| b.1.cmp(&a.1).then(b.0.cmp(&a.0)));
                owned.into_iter().skip(n).map(|(h, _)| h).collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn short_and_long_names_compare_hash_and_print_by_their_text() {
        for name in [
            "a",
            "x".repeat(22).as_str(),
            "y".repeat(23).as_str(),
            "üser 42",
        ] {
            let owner = Owner::new(name).unwrap();
            assert_eq!(owner.as_str(), name);
            assert_eq!(owner.to_string(), name);
            assert_eq!(owner, owner.clone());
            assert_eq!(format!("{owner:?}"), format!("{name:?}"));
        }
        let owners: HashSet<Owner> = ["b", "a", "b", &"c".repeat(40), &"c".repeat(40)]
            .into_iter()
            .map(|n| Owner::new(n).unwrap())
            .collect();
        assert_eq!(owners.len(), 3);
        let (short, long) = (
            Owner::new("z").unwrap(),
            Owner::new("a".repeat(30)).unwrap(),
        );
        assert!(long < short, "ordered by text, whatever the form");
        assert!(Owner::new("x".repeat(Owner::MAX_LEN)).is_ok());
        assert!(Owner::new("x".repeat(Owner::MAX_LEN + 1)).is_err());
        assert!(Owner::new("tab\there").is_err());
    }

    #[test]
    fn handles_parse_only_their_own_text() {
        let handle = Handle::from_bytes([0xab; 32]);
        assert_eq!(handle.to_string(), "ab".repeat(32));
        assert_eq!("ab".repeat(32).parse::<Handle>().unwrap(), handle);
        for bad in [
            "AB".repeat(32),
            "ab".repeat(31),
            "ab".repeat(33),
            "zz".repeat(32),
        ] {
            assert_eq!(bad.parse::<Handle>(), Err(ParseHandleError), "{bad}");
        }
    }

    #[test]
    fn endings_pick_what_they_name() {
        let at = |s: i64| OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(s);
        let h = |b: u8| Handle::from_bytes([b; 32]);
        let owned = vec![
            (h(1), at(30)),
            (h(2), at(10)),
            (h(3), at(20)),
            (h(4), at(20)),
        ];
        let sorted = |mut v: Vec<Handle>| {
            v.sort();
            v
        };
        assert_eq!(Ending::One(h(2)).pick(owned.clone()), [h(2)]);
        assert_eq!(Ending::One(h(9)).pick(owned.clone()), []);
        assert_eq!(
            sorted(Ending::AllBut(h(2)).pick(owned.clone())),
            [h(1), h(3), h(4)]
        );
        assert_eq!(
            sorted(Ending::All.pick(owned.clone())),
            [h(1), h(2), h(3), h(4)]
        );
        // Newest first (the later handle first among equals): 1, 4, 3, 2.
        assert_eq!(
            sorted(Ending::AllButNewest(2).pick(owned.clone())),
            [h(2), h(3)]
        );
        assert_eq!(Ending::AllButNewest(4).pick(owned.clone()), []);
        assert_eq!(
            sorted(Ending::AllButNewest(0).pick(owned)),
            [h(1), h(2), h(3), h(4)]
        );
    }
}
