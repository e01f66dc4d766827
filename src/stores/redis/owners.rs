//! The owner index of [`RedisStore`]: one sorted set per owner, written by the same
//! script round trip as the record, pruned when read.
//!
//! - An owner's index lives under `PREFIX owner: HEX`, where `HEX` is the SHA-256 of
//!   the owner's name (so keys hold no user names). Its members are the sessions'
//!   key digests in hexadecimal (a session's [`Handle`], and the end of its key), each
//!   scored by its record's expiry date in Unix milliseconds; the set itself expires
//!   no sooner than its latest member.
//! - An owned record's value carries a digest of its owner at a fixed place in its
//!   header, so that the scripts tell whose a session is without decoding it.
//! - Every write of an owned record (`create`, `save`, `update`) files it in the same
//!   script: the member is added (or its score moved) and the set's TTL extended;
//!   `create` and `save` (which add entries) drop the expired members too. A write
//!   that changes or drops the owner, and a `delete`, leave the old entry: a listing
//!   finds it stale and has a script remove it, after checking again, in one step,
//!   that the key holds no record of the owner. Nothing depends on keyspace
//!   notifications.
//! - Ending deletes, in one script per 256 sessions, each session whose value still
//!   names the owner, whatever was written to it meanwhile: a request in flight
//!   cannot keep a session from ending by writing it. "All" and "all but one" go
//!   through the set a page at a time until nothing is left to end, however many
//!   sessions the owner has.
//! - In Redis Cluster an owner's set and its sessions live on different nodes, so
//!   that no script could see both: a store on a cluster keeps no owners
//!   (`supports_owners` is `false`, and the owner methods fail with `Unsupported`).

use std::collections::HashSet;

use time::OffsetDateTime;

use super::{
    after_header,
    resp::{Reply, RespError, MAX_BULK},
    RedisStore, Request, Script, VERSION_LEN,
};
use crate::{
    session::{Ending, Handle, OwnedSession, Owner, Record},
    session_store::{Error, Result},
    stores::stored,
};

/// How many members a script takes or gives at once: one reply's worth of values.
const PAGE: usize = 256;

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
/// 0 when `NX` found the key taken by another write; a create sent again after its
/// reply was lost finds its own first copy (the same version, header and token) and
/// is written.
pub(super) const WRITE_OWNED_SCRIPT: &str = concat!(
    file_under_owner!(),
    r"
if ARGV[3] == 'NX' then
  if not redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2], 'NX') then
    if redis.call('GETRANGE', KEYS[1], 0, 28) ~= string.sub(ARGV[1], 1, 29) then return 0 end
  end
else
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
file(KEYS[2], ARGV[4], ARGV[5], ARGV[2], ARGV[6])
return 1
"
);

/// A page of an owner's live members, latest expiry first: KEYS[1] is the set;
/// ARGV[1] the time (Unix milliseconds), ARGV[2] the offset and ARGV[3] the page's
/// length. The first page drops the expired members first.
pub(super) const MEMBERS_SCRIPT: &str = r"
if ARGV[2] == '0' then redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1]) end
return redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', '(' .. ARGV[1], 'LIMIT', ARGV[2], ARGV[3])
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

/// Ends sessions of an owner, or prunes its set: KEYS[1] is the owner's set,
/// KEYS[2..n+1] the sessions' keys; ARGV[1] is `end` or `prune`, ARGV[2] the owner's
/// digest, ARGV[3] and ARGV[4] the time (Unix seconds, nanoseconds), ARGV[5..n+4] the
/// members. A key whose value names the owner (its header's tag is 180, 0xB4, and
/// its digest the owner's) is deleted with its entry (`end`) or kept (`prune`); any other
/// entry (no value, another owner, no owner) is removed from the set. Returns the
/// positions (1-based) of the live sessions it deleted.
pub(super) const END_SCRIPT: &str = r"
local n = #KEYS - 1
local now_secs, now_nanos = tonumber(ARGV[3]), tonumber(ARGV[4])
local ended = {}
for i = 1, n do
  local head = redis.call('GETRANGE', KEYS[i + 1], 8, 36)
  local mine = string.len(head) == 29 and string.byte(head, 1) == 180
    and string.sub(head, 22, 29) == ARGV[2]
  if not mine then
    redis.call('ZREM', KEYS[1], ARGV[i + 4])
  elseif ARGV[1] == 'end' then
    redis.call('DEL', KEYS[i + 1])
    redis.call('ZREM', KEYS[1], ARGV[i + 4])
    local secs, nanos = struct.unpack('>i8I4', head, 2)
    if secs > now_secs or (secs == now_secs and nanos > now_nanos) then
      ended[#ended + 1] = i
    end
  end
end
return ended
";

/// The length of the owner digest in an owned record's header.
pub(super) const OWNER_DIGEST_LEN: usize = 8;

/// The most sessions a listing shows (those expiring last), and the most bytes of
/// values it reads: a server cannot make one read more.
const MAX_LISTED: usize = 1024;
const MAX_LISTED_BYTES: usize = 32 << 20;

/// The most sessions a limit's ending reads to rank them (the latest-expiring):
/// beyond, the next login's limit step goes on where this one stopped.
const MAX_RANKED: usize = 1 << 16;

/// The most pages "all" and "all but one" go through: a bound on an ending that
/// other logins keep feeding.
const MAX_PAGES: usize = 4096;

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

/// A stored value read for a listing: its record (with a zero id: the listing knows
/// only the key's digest).
fn decode_listed(value: &[u8]) -> Result<Record> {
    let (_, bytes) = value
        .split_first_chunk::<VERSION_LEN>()
        .ok_or_else(|| Error::decode("stored value is shorter than its version"))?;
    stored::decode_listed(after_header(bytes)?)
}

fn unexpected(want: &str, reply: &Reply) -> Error {
    Error::backend(RespError::Protocol(format!("{want} answered {reply:?}")))
}

/// A page of members: each member's text and its handle (`None`: not a handle, an
/// entry nothing of this store wrote).
type Members = Vec<(Vec<u8>, Option<Handle>)>;

#[maybe_async::maybe_async]
impl RedisStore {
    /// The key of `owner`'s set, and the digest of the name that an owned record's
    /// header carries (its first bytes), from one SHA-256 of the name.
    pub(super) fn owner_keys(&self, owner: &Owner) -> (String, [u8; OWNER_DIGEST_LEN]) {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(owner.as_str().as_bytes());
        let mut short = [0; OWNER_DIGEST_LEN];
        short.copy_from_slice(&digest[..OWNER_DIGEST_LEN]);
        (
            stored::hex_key(&format!("{}owner:", self.prefix), &digest),
            short,
        )
    }

    /// The session key of a member.
    fn member_key(&self, member: &[u8]) -> String {
        format!("{}{}", self.prefix, String::from_utf8_lossy(member))
    }

    /// One page of `index`'s live members, latest expiry first, from `offset`.
    async fn members(&self, index: &str, offset: usize) -> Result<Members> {
        let now = unix_millis(OffsetDateTime::now_utc());
        let (offset, page) = (offset.to_string(), PAGE.to_string());
        let reply = self
            .script(
                Script::Members,
                &[index.as_bytes()],
                &[now.as_bytes(), offset.as_bytes(), page.as_bytes()],
            )
            .await?;
        let Reply::Array(items) = reply else {
            return Err(unexpected("the members script", &reply));
        };
        items
            .into_iter()
            .map(|item| match item {
                Reply::Bulk(member) => {
                    let handle = std::str::from_utf8(&member)
                        .ok()
                        .and_then(|text| text.parse::<Handle>().ok());
                    Ok((member, handle))
                }
                other => Err(unexpected("the members script", &other)),
            })
            .collect()
    }

    /// The values under `keys`, in order (`None`: no value), at most `budget` bytes
    /// in all beyond the first: fewer than asked when the budget runs out.
    async fn values(&self, keys: &[String], budget: usize) -> Result<Vec<Option<Vec<u8>>>> {
        let mut values: Vec<Option<Vec<u8>>> = Vec::with_capacity(keys.len());
        let mut spent = 0;
        while values.len() < keys.len() && (values.is_empty() || spent < budget) {
            // One reply carries one value of the largest size, and a little more.
            let left = budget.saturating_sub(spent).min(MAX_BULK - 64 * 1024);
            let rest = &keys[values.len()..keys.len().min(values.len() + PAGE)];
            let rest: Vec<&[u8]> = rest.iter().map(|k| k.as_bytes()).collect();
            let left = left.to_string();
            let reply = self
                .script(Script::Values, &rest, &[left.as_bytes()])
                .await?;
            let Reply::Array(items) = reply else {
                return Err(unexpected("the values script", &reply));
            };
            if items.is_empty() {
                return Err(unexpected("the values script", &Reply::Array(items)));
            }
            for item in items {
                match item {
                    Reply::Bulk(value) => {
                        spent += value.len();
                        values.push(Some(value));
                    }
                    Reply::Nil => values.push(None),
                    other => return Err(unexpected("the values script", &other)),
                }
            }
        }
        Ok(values)
    }

    /// Runs the end script (`mode`: `end` or `prune`) on `members` of `owner`'s set,
    /// 256 at a time; returns the handles of the live sessions it ended.
    async fn end_members(
        &self,
        owner: &Owner,
        mode: &str,
        members: &[(Vec<u8>, Option<Handle>)],
    ) -> Result<Vec<Handle>> {
        let (index, digest) = self.owner_keys(owner);
        let mut ended = Vec::new();
        for chunk in members.chunks(PAGE) {
            let now = OffsetDateTime::now_utc();
            let (secs, nanos) = (
                now.unix_timestamp().to_string(),
                now.nanosecond().to_string(),
            );
            let keys: Vec<String> = chunk.iter().map(|(m, _)| self.member_key(m)).collect();
            let mut key_args: Vec<&[u8]> = vec![index.as_bytes()];
            key_args.extend(keys.iter().map(|k| k.as_bytes()));
            let mut args: Vec<&[u8]> =
                vec![mode.as_bytes(), &digest, secs.as_bytes(), nanos.as_bytes()];
            args.extend(chunk.iter().map(|(m, _)| m.as_slice()));
            // An ending is a write the replicas must hold; a pruning is not.
            let request = Request::Script(Script::End, &key_args, &args);
            let sent = self.run(&request, mode == "end").await?;
            self.replicated(&sent)?;
            let reply = sent.reply;
            let Reply::Array(positions) = reply else {
                return Err(unexpected("the end script", &reply));
            };
            for position in positions {
                let at = match position {
                    Reply::Int(at) => usize::try_from(at).ok().and_then(|at| at.checked_sub(1)),
                    _ => None,
                };
                let handle = at.and_then(|at| chunk.get(at)).and_then(|(_, h)| *h);
                // A member that is not a handle names no session of this store's:
                // the script found no value of the owner's under it.
                ended.push(handle.ok_or_else(|| {
                    Error::backend(RespError::Protocol(
                        "the end script answered a position it was not given".into(),
                    ))
                })?);
            }
        }
        Ok(ended)
    }

    /// Up to `max` of `owner`'s live sessions (latest expiry first) and their
    /// records, reading at most `budget` bytes of values; stale entries (no record,
    /// another owner) are pruned on the way, by a script that checks again.
    async fn owned(
        &self,
        owner: &Owner,
        max: usize,
        budget: usize,
    ) -> Result<Vec<(Handle, Record)>> {
        let (index, _) = self.owner_keys(owner);
        let now = OffsetDateTime::now_utc();
        let mut owned = Vec::new();
        // Pages by offset may overlap when writes move members meanwhile.
        let mut seen = HashSet::new();
        let mut stale = Vec::new();
        let mut spent = 0;
        let mut offset = 0;
        while owned.len() < max && spent < budget {
            let page = self.members(&index, offset).await?;
            offset += page.len();
            let full = page.len() == PAGE;
            let keys: Vec<String> = page.iter().map(|(m, _)| self.member_key(m)).collect();
            let values = self.values(&keys, budget - spent).await?;
            let read = values.len();
            for ((text, handle), value) in page.into_iter().zip(values) {
                let Some(handle) = handle else {
                    stale.push((text, None));
                    continue;
                };
                let Some(value) = value else {
                    stale.push((text, Some(handle)));
                    continue;
                };
                spent += value.len();
                let record = match decode_listed(&value) {
                    Ok(record) => record,
                    Err(err) => {
                        // Left in the set: the end script still tells whose it is.
                        stored::unreadable_in_listing(&handle, &err);
                        continue;
                    }
                };
                let mine = record.ownership.as_ref().is_some_and(|o| o.owner == *owner);
                if !mine {
                    stale.push((text, Some(handle)));
                } else if !record.is_expired_at(now) && owned.len() < max && seen.insert(handle) {
                    owned.push((handle, record));
                }
            }
            if !full || read < keys.len() {
                break;
            }
        }
        if !stale.is_empty() {
            if let Err(err) = self.end_members(owner, "prune", &stale).await {
                log::warn!(
                    target: "portable_sessions::owners",
                    "could not remove stale entries from an owner's index in Redis (the \
                     next listing tries again): {}",
                    err.report()
                );
            }
        }
        Ok(owned)
    }

    /// A listing: at most 1,024 sessions (those expiring last) and 32 MiB of values.
    pub(super) async fn list_owned_now(&self, owner: &Owner) -> Result<Vec<OwnedSession>> {
        self.owned(owner, MAX_LISTED, MAX_LISTED_BYTES)
            .await?
            .into_iter()
            .map(|(handle, record)| OwnedSession::new(handle, record))
            .collect()
    }

    pub(super) async fn end_owned_now(&self, owner: &Owner, ending: Ending) -> Result<Vec<Handle>> {
        let keep = match ending {
            Ending::One(handle) => {
                let members = [(member(&handle).into_bytes(), Some(handle))];
                return self.end_members(owner, "end", &members).await;
            }
            Ending::AllButNewest(_) => return self.end_oldest(owner, ending).await,
            Ending::AllBut(handle) => Some(handle),
            Ending::All => None,
        };
        // A page at a time from the front: each page's members leave the set
        // (ended, or pruned as stale), but the one kept.
        let (index, _) = self.owner_keys(owner);
        let mut ended = Vec::new();
        for _ in 0..MAX_PAGES {
            let page = self.members(&index, 0).await?;
            let full = page.len() == PAGE;
            let page: Vec<_> = page
                .into_iter()
                .filter(|(_, handle)| keep.is_none() || *handle != keep)
                .collect();
            if page.is_empty() {
                return Ok(ended);
            }
            ended.extend(self.end_members(owner, "end", &page).await?);
            if !full {
                return Ok(ended);
            }
        }
        Err(Error::backend(format!(
            "an owner's sessions kept coming while they were ended, {MAX_PAGES} pages of {PAGE}"
        )))
    }

    /// The oldest beyond a limit: the owner's sessions ranked by when they got the
    /// owner (an unreadable one counts as the oldest), then the end script.
    async fn end_oldest(&self, owner: &Owner, ending: Ending) -> Result<Vec<Handle>> {
        let (index, _) = self.owner_keys(owner);
        let mut ranked = Vec::new();
        let mut seen = HashSet::new();
        let mut offset = 0;
        while ranked.len() < MAX_RANKED {
            let page = self.members(&index, offset).await?;
            offset += page.len();
            let full = page.len() == PAGE;
            let keys: Vec<String> = page.iter().map(|(m, _)| self.member_key(m)).collect();
            let mut values = Vec::with_capacity(keys.len());
            while values.len() < keys.len() {
                let more = self.values(&keys[values.len()..], MAX_BULK).await?;
                values.extend(more);
            }
            for ((_, handle), value) in page.into_iter().zip(values) {
                let (Some(handle), Some(value)) = (handle, value) else {
                    continue;
                };
                let created = match decode_listed(&value) {
                    Ok(record) => match record.ownership {
                        Some(ownership) if ownership.owner == *owner => ownership.created_at,
                        _ => continue,
                    },
                    Err(_) => OffsetDateTime::UNIX_EPOCH,
                };
                if seen.insert(handle) {
                    ranked.push((handle, created));
                }
            }
            if !full {
                break;
            }
        }
        let picked: Vec<(Vec<u8>, Option<Handle>)> = ending
            .pick(ranked)
            .into_iter()
            .map(|handle| (member(&handle).into_bytes(), Some(handle)))
            .collect();
        self.end_members(owner, "end", &picked).await
    }
}
