//! Which of a cluster's 16,384 slots a key belongs to.

/// How many slots a Redis Cluster has.
pub(crate) const SLOTS: usize = 16_384;

/// CRC16-CCITT (XMODEM: polynomial 0x1021, initial value 0), by byte.
const TABLE: [u16; 256] = {
    let mut table = [0u16; 256];
    let mut byte = 0;
    while byte < 256 {
        let mut crc = (byte as u16) << 8;
        let mut bit = 0;
        while bit < 8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
            bit += 1;
        }
        table[byte] = crc;
        byte += 1;
    }
    table
};

fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &byte| {
        (crc << 8) ^ TABLE[usize::from((crc >> 8) as u8 ^ byte)]
    })
}

/// The slot of `key`: the CRC16 of its hash tag (what stands between its first `{`
/// and the next `}`, when that is not empty), or of the whole key.
pub(crate) fn of(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            Some(&rest[..close]).filter(|tag| !tag.is_empty())
        })
        .unwrap_or(key);
    crc16(hashed) % SLOTS as u16
}

/// A short hash tag that falls in `slot`: a key ending in `{TAG}` lives there. The
/// first number (in decimal) whose CRC16 lands in each slot, found once for all.
pub(crate) fn tag(slot: u16) -> u32 {
    static TAGS: std::sync::OnceLock<Box<[u32]>> = std::sync::OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = vec![u32::MAX; SLOTS];
        let mut left = SLOTS;
        let mut n = 0u32;
        while left > 0 {
            let at = usize::from(crc16(n.to_string().as_bytes()) % SLOTS as u16);
            if tags[at] == u32::MAX {
                tags[at] = n;
                left -= 1;
            }
            n += 1;
        }
        tags.into_boxed_slice()
    });
    tags[usize::from(slot) % SLOTS]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_cluster_specification() {
        // The specification's check value, and slots `CLUSTER KEYSLOT` gives.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(of(b"foo"), 12182);
        assert_eq!(of(b"bar"), 5061);
        assert_eq!(of(b"{user1000}.following"), of(b"user1000"));
        assert_eq!(of(b"{user1000}.followers"), of(b"{user1000}.following"));
        // An empty tag, or none closed, hashes the whole key.
        assert_eq!(of(b"foo{}{bar}"), crc16(b"foo{}{bar}") % 16384);
        assert_eq!(of(b"foo{{bar}}zap"), of(b"{bar"));
        assert_eq!(of(b"foo{bar"), crc16(b"foo{bar") % 16384);
    }

    #[test]
    fn a_tag_for_every_slot() {
        for slot in [0u16, 1, 5061, 12182, 16383] {
            let key = format!("session:replicated{{{}}}", tag(slot));
            assert_eq!(of(key.as_bytes()), slot);
        }
    }
}
