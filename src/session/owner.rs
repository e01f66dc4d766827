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
/// listed and ended without a scan of every session. Cloning it is a reference count.
///
/// ```
/// use portable_sessions::session::Owner;
///
/// let owner = Owner::new("user-42").unwrap();
/// assert_eq!(owner.as_str(), "user-42");
/// assert!(Owner::new("").is_err());
/// assert!(Owner::new("a\nb").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner(Arc<str>);

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
        Ok(Self(name.into()))
    }

    /// The owner's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
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
