//! What the persistent stores write: a record keyed by a digest of its id, stored
//! without the id.
//!
//! A session id is a bearer credential: whoever holds it is logged in. A database file,
//! a backup or a Redis dump that held ids would hand every live session to whoever
//! reads it. So the stores here never write an id:
//!
//! - a record is found under the SHA-256 digest of its id's 16 bytes;
//! - the stored bytes are [`Record::encode_without_id`], and [`decode`] gives the
//!   record back the id the caller asked for;
//! - the network stores (Redis, PostgreSQL) put a [`key_check`] in front: a digest
//!   of the id (not the key's, and not revealing it) that ties the value to its key,
//!   so that a reply delivered for another key is refused.
//!
//! Why an unkeyed SHA-256 is enough: salts and keys protect low-entropy secrets
//! (passwords) against precomputed tables and guessing. An id is 128 bits from the
//! operating system's CSPRNG, so there is nothing to guess: recovering an id from its
//! digest is a preimage search over 2^128 inputs, and holding many digests only
//! divides that by their number (a billion sessions still leave about 2^98). A key
//! would add a secret that every process sharing the store must hold and keep stable,
//! for no gain. SHA-256 is a standard, widely audited one-way function, costs well
//! under a microsecond for 16 bytes, and is a small pure-Rust dependency.

use sha2::{Digest, Sha256};

use crate::{
    session::{Id, Record},
    session_store::Result,
};

/// The length of a storage key: a SHA-256 digest.
pub(crate) const DIGEST_LEN: usize = 32;

/// Returns the key a record is stored under: the SHA-256 digest of its id's bytes.
pub(crate) fn digest(id: &Id) -> [u8; DIGEST_LEN] {
    Sha256::digest(id.to_bytes()).into()
}

/// Writes `bytes` as lowercase hexadecimal after `prefix`.
#[cfg(any(feature = "redis", test))]
pub(crate) fn hex_key(prefix: &str, bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut key = String::with_capacity(prefix.len() + 2 * bytes.len());
    key.push_str(prefix);
    for &b in bytes {
        key.push(char::from(HEX[usize::from(b >> 4)]));
        key.push(char::from(HEX[usize::from(b & 15)]));
    }
    key
}

/// Encodes `record` for storage: without its id, so the stored bytes neither depend
/// on the id nor reveal it.
#[cfg(any(feature = "sqlite", test))]
pub(crate) fn encode(record: &Record) -> Result<Vec<u8>> {
    record.encode_without_id()
}

/// Decodes bytes written by [`encode`], [`encode_checked`] or [`encode_with_token`]
/// as the record with id `id`: bytes that carry a key check for another id are an
/// error, never that other session.
pub(crate) fn decode(id: &Id, bytes: &[u8]) -> Result<Record> {
    let (check, bytes) = split_prefix(bytes)?;
    if check.is_some_and(|check| check != key_check(id)) {
        return Err(crate::session_store::Error::decode(
            "the stored value carries another key's check: a reply meant for another \
             session (or a value copied under this key), refused",
        ));
    }
    Record::decode_with_id(*id, bytes)
}

/// Decodes bytes written by [`encode`], [`encode_checked`] or [`encode_with_token`]
/// for an owner's listing, where the id is not known (only its digest, the key the
/// row was found under): the key check is skipped, and the record gets a zero id,
/// which [`OwnedSession`](crate::session::OwnedSession) drops anyway.
pub(crate) fn decode_listed(bytes: &[u8]) -> Result<Record> {
    let (_, bytes) = split_prefix(bytes)?;
    Record::decode_with_id(Id::from_bytes([0; 16]), bytes)
}

/// The ownership of a record stored as [`encode`], [`encode_checked`] or
/// [`encode_with_token`] do, from the first
/// [`OWNED_PREFIX_LEN`] bytes of what they store.
#[cfg(feature = "postgres")]
pub(crate) fn decode_ownership(bytes: &[u8]) -> Result<Option<crate::session::Ownership>> {
    let (_, bytes) = split_prefix(bytes)?;
    Record::peek_ownership(bytes)
}

/// How many bytes of a stored record [`decode_ownership`] needs at most.
#[cfg(feature = "postgres")]
pub(crate) const OWNED_PREFIX_LEN: usize =
    1 + TOKEN_LEN + 1 + CHECK_LEN + Record::OWNERSHIP_PREFIX_LEN;

/// Splits the write token and key check, where there are, off the front of stored
/// bytes: the key check, if any, and the record's bytes.
fn split_prefix(bytes: &[u8]) -> Result<(Option<[u8; CHECK_LEN]>, &[u8])> {
    let truncated =
        |what: &str| crate::session_store::Error::decode(format!("{what} is truncated"));
    let bytes = match bytes.split_first() {
        Some((&TOKEN_TAG, rest)) => rest
            .get(TOKEN_LEN..)
            .ok_or_else(|| truncated("a write token"))?,
        _ => bytes,
    };
    match bytes.split_first() {
        Some((&CHECK_TAG, rest)) => {
            let (check, rest) = rest
                .split_first_chunk::<CHECK_LEN>()
                .ok_or_else(|| truncated("a key check"))?;
            Ok((Some(*check), rest))
        }
        _ => Ok((None, bytes)),
    }
}

/// Logs a record that an owner's listing (or ending) found but could not read: it is
/// left out, never guessed at, and stays in the store for `load` to report.
pub(crate) fn unreadable_in_listing(
    handle: &crate::session::Handle,
    err: &crate::session_store::Error,
) {
    log::warn!(
        target: "portable_sessions::owners",
        "an owner's session {} cannot be read, so it is not listed: {}",
        &handle.to_string()[..8],
        err.report()
    );
}

/// The byte in front of a key check: never the first byte of an encoded record.
pub(crate) const CHECK_TAG: u8 = 0xA8;

/// The length of a key check.
pub(crate) const CHECK_LEN: usize = 8;

/// The check that ties a stored value to the key it is stored under: a digest of the
/// id, apart from the key's own (which it does not reveal). A network store writes it
/// with every value and checks it on load, so that a reply delivered for another key
/// (a confused pooler, a proxy, a server that answers out of turn) is an error,
/// never another user's session. It is not a secret: it guards against mistakes
/// and misdelivery, not against whoever may write the store.
pub(crate) fn key_check(id: &Id) -> [u8; CHECK_LEN] {
    let mut hasher = Sha256::new();
    hasher.update(b"portable-sessions key check\0");
    hasher.update(id.to_bytes());
    let digest: [u8; DIGEST_LEN] = hasher.finalize().into();
    let mut check = [0; CHECK_LEN];
    check.copy_from_slice(&digest[..CHECK_LEN]);
    check
}

/// The key check of `id` behind its tag, to write in front of a record.
#[cfg(any(feature = "redis", feature = "postgres", test))]
pub(crate) fn tagged_key_check(id: &Id) -> [u8; 1 + CHECK_LEN] {
    let mut out = [0; 1 + CHECK_LEN];
    out[0] = CHECK_TAG;
    out[1..].copy_from_slice(&key_check(id));
    out
}

/// Encodes `record` for storage as [`encode`] does, behind its key check.
#[cfg(any(feature = "postgres", test))]
pub(crate) fn encode_checked(record: &Record) -> Result<Vec<u8>> {
    record.encode_without_id_after(&tagged_key_check(&record.id))
}

/// The error of a conditional write that was sent again after its connection closed
/// before the reply, and found another write in its place: whether its first copy
/// landed cannot be told. Answering `Conflict` would make the caller apply its
/// changes again over a record that may hold them already.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) fn unknown_outcome() -> crate::session_store::Error {
    crate::session_store::Error::backend(
        "a conditional write was sent again after its connection closed, and another \
         write came first: whether the first copy landed is unknown",
    )
}

/// The byte in front of a write token: never the first byte of an encoded record.
pub(crate) const TOKEN_TAG: u8 = 0xA7;

/// The length of a write token.
pub(crate) const TOKEN_LEN: usize = 8;

/// A write token: random bytes stored with a conditional write, so that a write sent
/// again after its reply was lost recognises its own first copy, if that landed,
/// instead of taking it for another request's write.
#[cfg(any(feature = "redis", feature = "postgres"))]
pub(crate) fn write_token() -> Result<[u8; TOKEN_LEN]> {
    let bytes = crate::session::random_id()?.to_bytes();
    let mut token = [0; TOKEN_LEN];
    token.copy_from_slice(&bytes[..TOKEN_LEN]);
    Ok(token)
}

/// Encodes `record` for storage as [`encode_checked`] does, behind [`TOKEN_TAG`] and
/// `token` (first, where a conditional write compares them).
#[cfg(any(feature = "postgres", test))]
pub(crate) fn encode_with_token(record: &Record, token: &[u8; TOKEN_LEN]) -> Result<Vec<u8>> {
    let mut head = [0; 1 + TOKEN_LEN + 1 + CHECK_LEN];
    head[0] = TOKEN_TAG;
    head[1..=TOKEN_LEN].copy_from_slice(token);
    head[1 + TOKEN_LEN..].copy_from_slice(&tagged_key_check(&record.id));
    record.encode_without_id_after(&head)
}

#[cfg(test)]
mod tests {
    use time::OffsetDateTime;

    use super::*;

    #[test]
    fn digest_is_sha256_of_the_id_bytes() {
        // SHA-256 of 16 zero bytes.
        assert_eq!(
            hex_key("", &digest(&Id::from_bytes([0; 16]))),
            "374708fff7719dd5979ec875d56cd2286f6d3cf7ec317a3b25632aab28ec37bb"
        );
    }

    #[test]
    fn a_value_checked_for_another_key_is_refused() {
        let mut record = Record::new(OffsetDateTime::UNIX_EPOCH);
        record.insert("user", "alice").unwrap();
        let other = Id::default();
        for bytes in [
            encode_checked(&record).unwrap(),
            encode_with_token(&record, &[7; TOKEN_LEN]).unwrap(),
        ] {
            let back = decode(&record.id, &bytes).unwrap();
            assert_eq!(
                back.get::<String>("user").unwrap().as_deref(),
                Some("alice")
            );
            let err = decode(&other, &bytes).unwrap_err();
            assert!(err.report().contains("another key"), "{}", err.report());
            assert!(decode(&record.id, &bytes[..bytes.len().min(12)]).is_err());
        }
        // Values written without a check (before it, or by SQLite) still decode.
        assert!(decode(&other, &encode(&record).unwrap()).is_ok());
    }

    #[test]
    fn stored_bytes_do_not_contain_the_id() {
        let mut record = Record::new(OffsetDateTime::UNIX_EPOCH);
        record.id = Id::from_bytes([0xa5; 16]);
        record.insert("k", "v").unwrap();
        let bytes = encode(&record).unwrap();
        assert!(!bytes.windows(16).any(|w| w == [0xa5; 16]));
        let other = Id::from_bytes([7; 16]);
        let back = decode(&other, &bytes).unwrap();
        assert_eq!(back.id, other);
        assert_eq!(back.get::<String>("k").unwrap().as_deref(), Some("v"));
    }
}
