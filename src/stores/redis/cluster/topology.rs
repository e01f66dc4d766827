//! A cluster's slot map, as `CLUSTER SLOTS` gives it.

use super::slot::SLOTS;
use crate::stores::{net::Address, redis::resp::Reply};

/// The slot ranges a node serves, as primary: `(first, last, node)`.
pub(crate) type Ranges = Vec<(u16, u16, Address)>;

/// Reads `CLUSTER SLOTS`' reply: for each range its first and last slot, then its
/// primary (host, port, id, ...), then its replicas. A primary named with no usable
/// host (empty, or `?`) is on the host that answered, `asked`.
pub(crate) fn parse(reply: &Reply, asked: &Address) -> Result<Ranges, String> {
    let Reply::Array(entries) = reply else {
        return Err(format!("CLUSTER SLOTS answered {reply:?}"));
    };
    let slot = |item: Option<&Reply>| match item {
        Some(&Reply::Int(n)) if (0..SLOTS as i64).contains(&n) => Ok(n as u16),
        other => Err(format!("CLUSTER SLOTS gave {other:?} for a slot")),
    };
    let mut ranges = Vec::with_capacity(entries.len());
    for entry in entries {
        let Reply::Array(items) = entry else {
            return Err(format!("CLUSTER SLOTS gave {entry:?} for a range"));
        };
        let (first, last) = (slot(items.first())?, slot(items.get(1))?);
        if first > last {
            return Err(format!("CLUSTER SLOTS gave the range {first}..{last}"));
        }
        let Some(Reply::Array(primary)) = items.get(2) else {
            return Err(format!("CLUSTER SLOTS gave no primary for {first}..{last}"));
        };
        let host = match primary.first() {
            Some(Reply::Bulk(host)) => String::from_utf8(host.clone())
                .map_err(|_| "CLUSTER SLOTS gave a host that is not UTF-8".to_owned())?,
            other => return Err(format!("CLUSTER SLOTS gave {other:?} for a host")),
        };
        let port = match primary.get(1) {
            Some(&Reply::Int(port)) => u16::try_from(port)
                .ok()
                .filter(|&port| port != 0)
                .ok_or_else(|| format!("CLUSTER SLOTS gave the port {port}"))?,
            other => return Err(format!("CLUSTER SLOTS gave {other:?} for a port")),
        };
        let host = match (host.as_str(), asked) {
            ("" | "?", Address::Tcp(asked, _)) => asked.clone(),
            ("" | "?", _) => return Err("CLUSTER SLOTS named a node by no host".into()),
            _ => host,
        };
        ranges.push((first, last, Address::Tcp(host, port)));
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(text: &str) -> Reply {
        Reply::Bulk(text.as_bytes().to_vec())
    }

    #[test]
    fn reads_ranges_and_their_primaries() {
        let asked = Address::Tcp("10.0.0.9".into(), 7000);
        let node = |host: &str, port| {
            Reply::Array(vec![
                bulk(host),
                Reply::Int(port),
                bulk("id"),
                Reply::Array(vec![bulk("hostname"), bulk("a")]),
            ])
        };
        let reply = Reply::Array(vec![
            Reply::Array(vec![
                Reply::Int(0),
                Reply::Int(5460),
                node("127.0.0.1", 7001),
                node("127.0.0.1", 7004),
            ]),
            Reply::Array(vec![Reply::Int(5461), Reply::Int(16383), node("", 7002)]),
        ]);
        assert_eq!(
            parse(&reply, &asked).unwrap(),
            vec![
                (0, 5460, Address::Tcp("127.0.0.1".into(), 7001)),
                (5461, 16383, Address::Tcp("10.0.0.9".into(), 7002)),
            ]
        );
    }

    #[test]
    fn refuses_what_is_not_a_slot_map() {
        let asked = Address::Tcp("h".into(), 1);
        for reply in [
            Reply::Int(1),
            Reply::Array(vec![Reply::Int(1)]),
            Reply::Array(vec![Reply::Array(vec![Reply::Int(5), Reply::Int(1)])]),
            Reply::Array(vec![Reply::Array(vec![
                Reply::Int(0),
                Reply::Int(16384),
                Reply::Array(vec![bulk("h"), Reply::Int(1)]),
            ])]),
            Reply::Array(vec![Reply::Array(vec![
                Reply::Int(0),
                Reply::Int(1),
                Reply::Array(vec![bulk("h"), Reply::Int(70000)]),
            ])]),
        ] {
            assert!(parse(&reply, &asked).is_err(), "{reply:?}");
        }
    }
}
