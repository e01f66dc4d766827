//! The owner index of [`RedisStore`]: one sorted set per owner, written by the same
//! script round trip as the record, pruned when read.
//!
//! - An owner's index lives under `PREFIX owner: HEX`, where `HEX` is the SHA-256 of
//!   the owner's name (so keys hold no user names). Its members are the sessions'
//!   key digests in hexadecimal (a session's [`Handle`], and the end of its key), each
//!   scored by its record's expiry date in Unix milliseconds; the set itself expires
//!   no sooner than its latest member.
//! - Every write of an owned record (`create`, `save`, `update`) files it in the same
//!   script: the member is added (or its score moved) and the set's TTL extended;
//!   `create` and `save` (which add entries) drop the expired members too. A write that changes or drops the owner, and a
//!   `delete`, leave the old entry: a listing finds it stale (no record, another
//!   owner, expired) and removes it, with every expired member. Nothing depends on
//!   keyspace notifications.
//! - Ending reads the owner's live records, then deletes those its [`Ending`]
//!   names in one script, each only if its version is still the one read: a write
//!   that came in between (a request in flight, a login moving the id) is seen by
//!   reading again, so an ending never deletes a record it did not check, and never
//!   misses one that was written meanwhile.

use time::OffsetDateTime;

use super::{
    resp::{Reply, RespError, MAX_ARRAY, MAX_BULK},
    RedisStore, Script, HEADER_LEN, HEADER_TAG, VERSION_LEN,
};
use crate::{
    session::{Ending, Handle, OwnedSession, Owner, Record},
    session_store::{Error, Result},
    stores::stored,
};

/// Files a session under its owner: the Lua function the writing scripts share.
/// `index` is the owner's set, `member` the session's digest, `score` its expiry
/// (Unix milliseconds), `ttl` its TTL (milliseconds) and `now` the time (Unix
/// milliseconds) before which members are dropped, or `nil` to leave that to a
/// listing and the next `create` (an `update`, the write of every request, skips
/// it: only a new session adds an entry).
macro_rules! file_under_owner {
    () => {
        r"
local function file(index, member, score, ttl, now)
  if now then redis.call('ZREMRANGEBYSCORE', index, '-inf', now) end
  redis.call('ZADD', index, score, member)
  if redis.call('PTTL', index) < tonumber(ttl) then
    redis.call('PEXPIRE', index, ttl)
  end
end
"
    };
}
pub(super) use file_under_owner;

/// Writes an owned record (`create` or `save`) and files it, in one step.
///
/// KEYS[1] is the session's key, KEYS[2] its owner's set; ARGV[1] the value, ARGV[2]
/// its TTL in milliseconds, ARGV[3] `NX` (create: only if the key is free) or `ANY`,
/// ARGV[4] the member, ARGV[5] the score, ARGV[6] the time. Returns 1 once written,
/// 0 when `NX` found the key taken.
pub(super) const WRITE_OWNED_SCRIPT: &str = concat!(
    file_under_owner!(),
    r"
if ARGV[3] == 'NX' then
  if not redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX') then return 0 end
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
file(KEYS[2], ARGV[4], ARGV[5], ARGV[2], ARGV[6])
return 1
"
);

/// A page of an owner's live members: KEYS[1] is the set; ARGV[1] the time (Unix
/// milliseconds), ARGV[2] the offset and ARGV[3] the page's length. The first page
/// drops the expired members first.
pub(super) const MEMBERS_SCRIPT: &str = r"
if ARGV[2] == '0' then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1]) end
return redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'LIMIT', ARGV[2], ARGV[3])
";

/// Reads the values of KEYS, in order, as far as ARGV[1] bytes go (the first always):
/// one nil (`false`) for each missing key. The caller asks again for the rest.
pub(super) const VALUES_SCRIPT: &str = r"
local out, total = {}, 0
for i, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  if value then
    if i > 1 and total + #value > tonumber(ARGV[1]) then break end
    total = total + #value
  end
  out[#out + 1] = value
end
return out
";

/// Ends sessions: KEYS[1] is the owner's set, KEYS[2..n+1] the sessions' keys;
/// ARGV[1..n] the version each was read at (its value's first 8 bytes), ARGV[n+1..2n]
/// the members. Deletes each session still at that version, with its entry, and
/// returns the positions (1-based) of those it deleted.
pub(super) const END_SCRIPT: &str = r"
local n = #KEYS - 1
local ended = {}
for i = 1, n do
  if redis.call('GETRANGE', KEYS[i + 1], 0, 7) == ARGV[i] then
    redis.call('DEL', KEYS[i + 1])
    redis.call('ZREM', KEYS[1], ARGV[n + i])
    ended[#ended + 1] = i
  end
end
return ended
";

/// The most sessions an owner's listing reads: a server cannot make one read more.
const MAX_LISTED: usize = 1024;

/// How many times an ending reads again after writes kept coming between its read
/// and its delete.
const MAX_END_ROUNDS: usize = 16;

/// One live session of an owner as read: its handle, the version its value had,
/// and its record.
struct Owned {
    handle: Handle,
    version: [u8; VERSION_LEN],
    record: Record,
}

/// The member of a session in its owner's set: its key digest in hexadecimal.
fn member(handle: &Handle) -> String {
    stored::hex_key("", &handle.to_bytes())
}

/// Milliseconds since the Unix epoch, saturated.
pub(super) fn unix_millis(at: OffsetDateTime) -> String {
    let millis = at.unix_timestamp_nanos().div_euclid(1_000_000);
    i64::try_from(millis)
        .unwrap_or(if millis < 0 { i64::MIN } else { i64::MAX })
        .to_string()
}

/// A stored value read for a listing: its version and its record (with a zero id:
/// the listing knows only the key's digest).
fn decode_listed(value: &[u8]) -> Result<([u8; VERSION_LEN], Record)> {
    let (version, mut bytes) = value
        .split_first_chunk::<VERSION_LEN>()
        .ok_or_else(|| Error::decode("stored value is shorter than its version"))?;
    if bytes.first() == Some(&HEADER_TAG) {
        bytes = bytes
            .get(HEADER_LEN..)
            .ok_or_else(|| Error::decode("stored value is shorter than its header"))?;
    }
    Ok((*version, stored::decode_listed(bytes)?))
}

fn unexpected(want: &str, reply: &Reply) -> Error {
    Error::backend(RespError::Protocol(format!("{want} answered {reply:?}")))
}

#[maybe_async::maybe_async]
impl RedisStore {
    /// The key of `owner`'s set.
    pub(super) fn owner_key(&self, owner: &Owner) -> String {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(owner.as_str().as_bytes());
        stored::hex_key(&format!("{}owner:", self.prefix), &digest)
    }

    /// `owner`'s live sessions; stale entries (no record, another owner, expired)
    /// are removed from the set on the way, best effort.
    async fn owned(&self, owner: &Owner) -> Result<Vec<Owned>> {
        let index = self.owner_key(owner);
        let now = OffsetDateTime::now_utc();
        let now_millis = unix_millis(now);
        let mut members: Vec<Vec<u8>> = Vec::new();
        loop {
            let offset = members.len().to_string();
            let page = MAX_ARRAY.to_string();
            let reply = self
                .script(
                    Script::Members,
                    &[index.as_bytes()],
                    &[now_millis.as_bytes(), offset.as_bytes(), page.as_bytes()],
                )
                .await?;
            let Reply::Array(items) = reply else {
                return Err(unexpected("the members script", &reply));
            };
            let full = items.len() == MAX_ARRAY;
            for item in items {
                match item {
                    Reply::Bulk(member) => members.push(member),
                    other => return Err(unexpected("the members script", &other)),
                }
            }
            if members.len() > MAX_LISTED {
                return Err(Error::backend(format!(
                    "an owner has more than {MAX_LISTED} live sessions: more than a listing reads"
                )));
            }
            if !full {
                break;
            }
        }
        let keys: Vec<String> = members
            .iter()
            .map(|m| format!("{}{}", self.prefix, String::from_utf8_lossy(m)))
            .collect();
        let mut values: Vec<Option<Vec<u8>>> = Vec::with_capacity(keys.len());
        // The reply may carry one bulk string of the largest size, and a little more.
        let budget = (MAX_BULK - 64 * 1024).to_string();
        while values.len() < keys.len() {
            let rest = &keys[values.len()..keys.len().min(values.len() + MAX_ARRAY)];
            let keys: Vec<&[u8]> = rest.iter().map(|k| k.as_bytes()).collect();
            let reply = self
                .script(Script::Values, &keys, &[budget.as_bytes()])
                .await?;
            let Reply::Array(items) = reply else {
                return Err(unexpected("the values script", &reply));
            };
            if items.is_empty() {
                return Err(unexpected("the values script", &Reply::Array(items)));
            }
            for item in items {
                match item {
                    Reply::Bulk(value) => values.push(Some(value)),
                    Reply::Nil => values.push(None),
                    other => return Err(unexpected("the values script", &other)),
                }
            }
        }
        let mut owned = Vec::new();
        let mut stale: Vec<&[u8]> = Vec::new();
        for (member_text, value) in members.iter().zip(values) {
            let handle = std::str::from_utf8(member_text)
                .ok()
                .and_then(|text| text.parse::<Handle>().ok());
            let Some(handle) = handle else {
                stale.push(member_text);
                continue;
            };
            let Some(value) = value else {
                stale.push(member_text);
                continue;
            };
            let (version, record) = match decode_listed(&value) {
                Ok(decoded) => decoded,
                Err(err) => {
                    // Left in the set: its owner cannot be checked.
                    stored::unreadable_in_listing(&handle, &err);
                    continue;
                }
            };
            let mine = record.ownership.as_ref().is_some_and(|o| o.owner == *owner);
            if !mine || record.is_expired_at(now) {
                stale.push(member_text);
                continue;
            }
            owned.push(Owned {
                handle,
                version,
                record,
            });
        }
        if !stale.is_empty() {
            let mut args: Vec<&[u8]> = vec![b"ZREM", index.as_bytes()];
            args.extend(stale);
            if let Err(err) = self.call(&args).await {
                log::warn!(
                    target: "portable_sessions::redis",
                    "could not remove stale entries from an owner's index (they are tried \
                     again at the next listing): {}",
                    err.report()
                );
            }
        }
        Ok(owned)
    }

    pub(super) async fn list_owned_now(&self, owner: &Owner) -> Result<Vec<OwnedSession>> {
        self.owned(owner)
            .await?
            .into_iter()
            .map(|owned| OwnedSession::new(owned.handle, owned.record))
            .collect()
    }

    pub(super) async fn end_owned_now(&self, owner: &Owner, ending: Ending) -> Result<Vec<Handle>> {
        let index = self.owner_key(owner);
        let mut ended = Vec::new();
        for _ in 0..MAX_END_ROUNDS {
            let owned = self.owned(owner).await?;
            let created = |o: &Owned| {
                o.record
                    .ownership
                    .as_ref()
                    .map_or(OffsetDateTime::UNIX_EPOCH, |o| o.created_at)
            };
            let picked = ending.pick(owned.iter().map(|o| (o.handle, created(o))).collect());
            let picked: Vec<&Owned> = owned
                .iter()
                .filter(|o| picked.contains(&o.handle))
                .collect();
            if picked.is_empty() {
                return Ok(ended);
            }
            let keys: Vec<String> = picked
                .iter()
                .map(|o| format!("{}{}", self.prefix, member(&o.handle)))
                .collect();
            let members: Vec<String> = picked.iter().map(|o| member(&o.handle)).collect();
            let mut key_args: Vec<&[u8]> = vec![index.as_bytes()];
            key_args.extend(keys.iter().map(|k| k.as_bytes()));
            let mut args: Vec<&[u8]> = picked.iter().map(|o| &o.version[..]).collect();
            args.extend(members.iter().map(|m| m.as_bytes()));
            let reply = self.script(Script::End, &key_args, &args).await?;
            let Reply::Array(positions) = reply else {
                return Err(unexpected("the end script", &reply));
            };
            for position in positions {
                let handle = match position {
                    Reply::Int(at) => usize::try_from(at)
                        .ok()
                        .and_then(|at| picked.get(at.checked_sub(1)?))
                        .map(|o| o.handle),
                    _ => None,
                };
                ended.push(handle.ok_or_else(|| {
                    Error::backend(RespError::Protocol(
                        "the end script answered a position it was not given".into(),
                    ))
                })?);
            }
            if ended.len() >= picked.len() && matches!(ending, Ending::One(_)) {
                return Ok(ended);
            }
            // Read again: sessions written meanwhile are checked anew, and those
            // this round ended are no longer there.
        }
        Err(Error::backend(format!(
            "an owner's sessions kept being written between reading and ending them, \
             {MAX_END_ROUNDS} times in a row"
        )))
    }
}
