//! Interop with tower-sessions, both ways (feature `tower-sessions`, async mode):
//! [`TowerSessionsStore`] makes any of our stores a tower-sessions store, and
//! [`FromTowerSessions`] makes any tower-sessions store one of ours.
//!
//! # Versions
//!
//! tower-sessions' stores and its latest core are on two versions of one trait: the
//! published stores (sqlx 0.15, moka 0.15, memory 0.14, redis 0.16) implement
//! `tower_sessions_core` 0.14's `SessionStore`, while tower-sessions 0.15 (its
//! layer) takes 0.15's. So [`TowerSessionsStore`] implements both, and an application
//! on either version swaps its store in one line; [`FromTowerSessions`] takes 0.14's,
//! the one its stores implement.
//!
//! # Values
//!
//! tower-sessions keeps each value as a `serde_json::Value`; this crate keeps bytes,
//! postcard-encoded by its typed API behind a shape tag. Through
//! [`TowerSessionsStore`], a value is kept as its JSON text behind the tag that is
//! never checked (`[0, 0]`), so whatever tower-sessions writes it reads back exactly
//! (read it through tower-sessions: this crate's typed `get` expects postcard). Through
//! [`FromTowerSessions`], each value's bytes travel as a JSON array of byte values,
//! and the record's version under a reserved key, so that everything this crate
//! writes it reads back exactly.

use async_trait::async_trait;
use serde_json::Value;
use time::OffsetDateTime;

use crate::{
    session::expiry::is_reserved,
    session::{Id, Record, UNCHECKED_TAG},
    session_store::{Error, Result},
    SessionStore,
};

/// One of this crate's stores, as a tower-sessions store (`tower_sessions_core`
/// 0.14's and 0.15's `SessionStore`): an application on tower-sessions swaps its store
/// in one line and keeps its layer.
///
/// ```
/// use portable_sessions::{MemoryStore, TowerSessionsStore};
///
/// // Where a tower-sessions application had `MemoryStore::default()`:
/// let store = TowerSessionsStore::new(MemoryStore::new());
/// # let _ = store;
/// ```
///
/// Writes are tower-sessions' whole-record saves (its API has no versions); ids keep
/// their text form. Its `save` is an upsert, as tower-sessions' contract has it: a
/// save that comes after a logout (a request that loaded the session before
/// another one deleted it) writes the session back, where this crate's own
/// [`Session`](crate::session::Session) would not. `create` never overwrites. Errors map to tower-sessions' kind of the same name, with the
/// whole chain of causes as the message.
#[derive(Debug, Clone)]
pub struct TowerSessionsStore<S>(S);

impl<S> TowerSessionsStore<S> {
    /// Wraps `store`.
    pub fn new(store: S) -> Self {
        Self(store)
    }

    /// Returns the wrapped store.
    pub fn into_inner(self) -> S {
        self.0
    }
}

/// A tower-sessions store (`tower_sessions_core` 0.14's `SessionStore`: sqlx,
/// MongoDB, DynamoDB, moka, ...) as one of this crate's stores, for
/// [`SessionManager`](crate::SessionManager) and [`Session`](crate::session::Session).
///
/// tower-sessions' API has no conditional write, so [`update`](SessionStore::update)
/// is the provided, non-atomic one (load, compare, save) and
/// [`atomic_update`](SessionStore::atomic_update) says `false`: two concurrent
/// requests of one session can still both write. Prefer this crate's stores where
/// that matters. Expired records never load, whatever the wrapped store does.
///
/// Only records this crate wrote there load: each carries its version under a
/// reserved key, and a record without one (written by tower-sessions itself, even
/// one whose values all happen to be arrays of bytes) fails with
/// [`Error::Decode`]. Since the update is not atomic, a
/// [`cycle_id`](crate::session::Session::cycle_id) deletes the old record instead
/// of leaving a marker, and a logout deletes: nothing is written with a date in the
/// past (tower-sessions' Redis store refuses one), and nothing is left for a store
/// that never frees expired records (its memory store).
#[derive(Debug, Clone)]
pub struct FromTowerSessions<S>(S);

impl<S> FromTowerSessions<S> {
    /// Wraps `store`.
    pub fn new(store: S) -> Self {
        Self(store)
    }

    /// Returns the wrapped store.
    pub fn into_inner(self) -> S {
        self.0
    }
}

/// The key under which [`FromTowerSessions`] keeps a record's version.
const VERSION_KEY: &str = "\0version";

/// The key whose presence says that [`FromTowerSessions`] wrote the record's values
/// with their shape tags; records written before tags existed have none.
const TAGGED_KEY: &str = "\0tagged";

macro_rules! tower_store {
    ($core:ident) => {
        fn record_from(record: &$core::session::Record) -> $core::session_store::Result<Record> {
            let mut ours = Record::with_id(
                Id::from_bytes(record.id.0.to_le_bytes()),
                record.expiry_date,
            );
            for (key, value) in &record.data {
                // The stored form of a value: a shape tag (unchecked: it is JSON,
                // not postcard), then the JSON text.
                let mut json = UNCHECKED_TAG.to_vec();
                serde_json::to_writer(&mut json, value)
                    .map_err(|err| $core::session_store::Error::Encode(err.to_string()))?;
                ours.insert_raw(key.clone(), json);
            }
            Ok(ours)
        }

        fn record_to(record: Record) -> $core::session_store::Result<$core::session::Record> {
            let mut data = std::collections::HashMap::new();
            for key in record.keys().filter(|key| !is_reserved(key)) {
                let bytes = record.get_raw(key).unwrap_or_default();
                // Written with the unchecked tag, or before tags existed (records
                // of the older formats read with it too): JSON never starts with NUL.
                let bytes = bytes.strip_prefix(&UNCHECKED_TAG[..]).unwrap_or(bytes);
                let value = serde_json::from_slice::<Value>(bytes).map_err(|err| {
                    $core::session_store::Error::Decode(format!(
                        "the value under {key:?} was not written through tower-sessions: {err}"
                    ))
                })?;
                data.insert(key.to_owned(), value);
            }
            Ok($core::session::Record {
                id: $core::session::Id(i128::from_le_bytes(record.id.to_bytes())),
                data,
                expiry_date: record.expiry_date,
            })
        }

        fn error(err: Error) -> $core::session_store::Error {
            match err {
                Error::Encode(_) => $core::session_store::Error::Encode(err.report()),
                Error::Decode(_) => $core::session_store::Error::Decode(err.report()),
                Error::Backend(_) => $core::session_store::Error::Backend(err.report()),
            }
        }

        #[async_trait]
        impl<S: SessionStore> $core::SessionStore for TowerSessionsStore<S> {
            async fn create(
                &self,
                record: &mut $core::session::Record,
            ) -> $core::session_store::Result<()> {
                let mut ours = record_from(record)?;
                self.0.create(&mut ours).await.map_err(error)?;
                record.id = $core::session::Id(i128::from_le_bytes(ours.id.to_bytes()));
                Ok(())
            }

            async fn save(
                &self,
                record: &$core::session::Record,
            ) -> $core::session_store::Result<()> {
                let ours = record_from(record)?;
                self.0.save(&ours).await.map_err(error)
            }

            async fn load(
                &self,
                id: &$core::session::Id,
            ) -> $core::session_store::Result<Option<$core::session::Record>> {
                let id = Id::from_bytes(id.0.to_le_bytes());
                let found = self.0.load(&id).await.map_err(error)?;
                found.map(record_to).transpose()
            }

            async fn delete(&self, id: &$core::session::Id) -> $core::session_store::Result<()> {
                let id = Id::from_bytes(id.0.to_le_bytes());
                self.0.delete(&id).await.map_err(error)
            }
        }
    };
}

mod v0_14 {
    use super::*;
    use tower_sessions_core as core_0_14;
    tower_store!(core_0_14);
}

mod v0_15 {
    use super::*;
    use tower_sessions_core_0_15 as core_0_15;
    tower_store!(core_0_15);
}

use tower_sessions_core as theirs;

fn to_theirs(record: &Record) -> theirs::session::Record {
    let mut data: std::collections::HashMap<String, Value> = record
        .keys()
        .map(|key| {
            let bytes = record.get_raw(key).unwrap_or_default();
            (key.to_owned(), Value::from(bytes.to_vec()))
        })
        .collect();
    data.insert(VERSION_KEY.to_owned(), Value::from(record.version));
    data.insert(TAGGED_KEY.to_owned(), Value::Bool(true));
    theirs::session::Record {
        id: theirs::session::Id(i128::from_le_bytes(record.id.to_bytes())),
        data,
        expiry_date: record.expiry_date,
    }
}

fn from_theirs(record: theirs::session::Record) -> Result<Record> {
    let mut ours = Record::with_id(
        Id::from_bytes(record.id.0.to_le_bytes()),
        record.expiry_date,
    );
    let mut versioned = false;
    let tagged = record.data.contains_key(TAGGED_KEY);
    for (key, value) in record.data {
        if key == TAGGED_KEY {
            continue;
        }
        if key == VERSION_KEY {
            ours.version = value
                .as_u64()
                .ok_or_else(|| Error::decode("the record's version is not a number"))?;
            versioned = true;
            continue;
        }
        let bytes = match value {
            Value::Array(items) => items
                .iter()
                .map(|item| item.as_u64().and_then(|b| u8::try_from(b).ok()))
                .collect::<Option<Vec<u8>>>(),
            _ => None,
        }
        .ok_or_else(|| {
            Error::decode(format!(
                "the value under {key:?} was not written by portable-sessions"
            ))
        })?;
        let bytes = if tagged {
            bytes
        } else {
            // Written before values had shape tags: they read unchecked.
            let mut untagged = UNCHECKED_TAG.to_vec();
            untagged.extend_from_slice(&bytes);
            untagged
        };
        ours.insert_raw(key, bytes);
    }
    if !versioned {
        // Values that happen to be arrays of bytes do not make a record of ours:
        // every record this crate writes there carries its version.
        return Err(Error::decode(format!(
            "the record has no {VERSION_KEY:?} key: it was not written by portable-sessions"
        )));
    }
    Ok(ours)
}

fn theirs_error(err: theirs::session_store::Error) -> Error {
    match err {
        theirs::session_store::Error::Encode(text) => Error::encode(text),
        theirs::session_store::Error::Decode(text) => Error::decode(text),
        theirs::session_store::Error::Backend(text) => Error::backend(text),
    }
}

#[async_trait]
impl<S: theirs::SessionStore> SessionStore for FromTowerSessions<S> {
    async fn create(&self, record: &mut Record) -> Result<()> {
        let mut converted = to_theirs(record);
        self.0.create(&mut converted).await.map_err(theirs_error)?;
        record.id = Id::from_bytes(converted.id.0.to_le_bytes());
        Ok(())
    }

    async fn save(&self, record: &Record) -> Result<()> {
        self.0.save(&to_theirs(record)).await.map_err(theirs_error)
    }

    async fn load(&self, id: &Id) -> Result<Option<Record>> {
        let theirs_id = theirs::session::Id(i128::from_le_bytes(id.to_bytes()));
        let found = self.0.load(&theirs_id).await.map_err(theirs_error)?;
        let Some(found) = found else {
            return Ok(None);
        };
        let record = from_theirs(found)?;
        Ok(Some(record).filter(|r| !r.is_expired_at(OffsetDateTime::now_utc())))
    }

    async fn delete(&self, id: &Id) -> Result<()> {
        let theirs_id = theirs::session::Id(i128::from_le_bytes(id.to_bytes()));
        self.0.delete(&theirs_id).await.map_err(theirs_error)
    }
}
