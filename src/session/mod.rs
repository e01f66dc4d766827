//! Session identifiers and records.
//!
//! An [`Id`] is the random bearer token that travels in the session cookie; a
//! [`Record`] is what a [`SessionStore`](crate::SessionStore) keeps under it: the id,
//! an expiry date and a map of values, each already encoded with postcard. A
//! [`Session`] is a request's handle on one record; [`Expiry`] and [`SessionConfig`]
//! decide when it ends.
//!
//! - `id`: the id and its text form;
//! - `record`: the record and its codec's framing;
//! - `codec`: the values' layout in one buffer, edited in place;
//! - `shape`: each value's shape tag;
//! - `expiry`: the policies and the dates they give;
//! - `handle`: the request's [`Session`];
//! - `owner`: a session's [`Owner`], and listing and ending an owner's sessions.

mod codec;
pub(crate) mod expiry;
pub(crate) mod handle;
mod id;
mod owner;
mod random;
mod record;
mod shape;

#[cfg(all(feature = "tower-sessions", not(feature = "sync")))]
pub(crate) use self::shape::UNCHECKED as UNCHECKED_TAG;
pub(crate) use self::{id::random_id, shape::encode_value};

pub use self::{
    expiry::{Expiry, SessionConfig},
    handle::Session,
    id::{Id, ParseIdError},
    owner::{Ending, Handle, OwnedSession, Owner, Ownership, ParseHandleError},
    record::Record,
};
