//! [`Id`]: the session identifier, its text form, and drawing fresh ones.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

use crate::session_store::{Error, Result};

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
        super::random::bytes16().map(Self::from_bytes)
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

/// Each byte's base64url value, or `INVALID`: one load per character when parsing.
const B64_VALUES: [u8; 256] = {
    let mut values = [INVALID; 256];
    let mut i = 0;
    while i < 64 {
        values[B64[i] as usize] = i as u8;
        i += 1;
    }
    values
};

/// Marks a byte outside the alphabet in `B64_VALUES`: a bit no value has.
const INVALID: u8 = 0x80;

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
        // Every character looked up first, then one test for a bad one among them
        // (this runs for each session cookie of each request).
        let mut values = [0u32; Self::TEXT_LEN];
        let mut seen = 0u8;
        for (&c, v) in text.iter().zip(values.iter_mut()) {
            let value = B64_VALUES[usize::from(c)];
            seen |= value;
            *v = u32::from(value);
        }
        if seen & INVALID != 0 {
            let at = text
                .iter()
                .position(|&c| B64_VALUES[usize::from(c)] == INVALID)
                .unwrap_or(0);
            return Err(ParseIdError {
                kind: ParseIdErrorKind::Character(at),
            });
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
}
