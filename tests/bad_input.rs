//! Bad input gets an error, never a panic: id text, stored bytes, values of the wrong
//! type. Property tests throw arbitrary input at each entry point.

use std::collections::BTreeMap;

use portable_sessions::{
    session::{Id, Owner, Ownership, Record},
    session_store::Error,
};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

fn any_expiry() -> impl Strategy<Value = OffsetDateTime> {
    // Every instant `time` can represent, to the nanosecond.
    let min = OffsetDateTime::new_utc(time::Date::MIN, time::Time::MIDNIGHT).unix_timestamp_nanos();
    let max = OffsetDateTime::new_utc(time::Date::MAX, time::Time::MAX).unix_timestamp_nanos();
    (min..=max).prop_map(|nanos| OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap())
}

fn any_record() -> impl Strategy<Value = Record> {
    (
        any::<[u8; 16]>(),
        any_expiry(),
        proptest::collection::btree_map(
            ".{0,12}",
            proptest::collection::vec(any::<u8>(), 0..40),
            0..8,
        ),
    )
        .prop_map(|(id, expiry, values)| {
            let mut record = Record::new(expiry);
            record.id = Id::from_bytes(id);
            for (key, bytes) in values {
                record.insert_raw(key, bytes);
            }
            record
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn id_from_any_string_is_ok_only_for_canonical_text(text in ".{0,40}") {
        match text.parse::<Id>() {
            Ok(id) => prop_assert_eq!(id.to_string(), text),
            Err(err) => prop_assert!(err.to_string().starts_with("invalid session id")),
        }
    }

    #[test]
    fn id_from_base64url_like_strings(text in "[A-Za-z0-9_=+/-]{20,24}") {
        if let Ok(id) = text.parse::<Id>() {
            prop_assert_eq!(id.to_string(), text);
        }
    }

    #[test]
    fn id_text_round_trips(bytes in any::<[u8; 16]>()) {
        let id = Id::from_bytes(bytes);
        let text = id.to_string();
        prop_assert_eq!(text.len(), Id::TEXT_LEN);
        prop_assert_eq!(text.parse::<Id>().unwrap(), id);
        prop_assert_eq!(id.to_bytes(), bytes);
    }

    #[test]
    fn decode_of_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Err(err) = Record::decode(&bytes) {
            prop_assert!(matches!(err, Error::Decode(_)));
        }
    }

    #[test]
    fn decode_of_versioned_garbage_never_panics(tail in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut bytes = vec![Record::FORMAT_VERSION];
        bytes.extend(tail);
        if let Err(err) = Record::decode(&bytes) {
            prop_assert!(matches!(err, Error::Decode(_)));
        }
    }

    #[test]
    fn records_round_trip(record in any_record()) {
        let bytes = record.encode().unwrap();
        prop_assert_eq!(Record::decode(&bytes).unwrap(), record);
    }

    #[test]
    fn records_round_trip_without_their_id(record in any_record()) {
        let bytes = record.encode_without_id().unwrap();
        prop_assert_eq!(Record::decode_with_id(record.id, &bytes).unwrap(), record);
    }

    #[test]
    fn decode_with_id_of_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Err(err) = Record::decode_with_id(Id::from_bytes([1; 16]), &bytes) {
            prop_assert!(matches!(err, Error::Decode(_)));
        }
    }

    #[test]
    fn every_truncation_and_extension_is_rejected(record in any_record(), extra in any::<u8>()) {
        let bytes = record.encode().unwrap();
        for len in 0..bytes.len() {
            prop_assert!(matches!(Record::decode(&bytes[..len]), Err(Error::Decode(_))));
        }
        let mut longer = bytes.clone();
        longer.push(extra);
        prop_assert!(matches!(Record::decode(&longer), Err(Error::Decode(_))));

        let bytes = record.encode_without_id().unwrap();
        for len in 0..bytes.len() {
            prop_assert!(matches!(Record::decode_with_id(record.id, &bytes[..len]), Err(Error::Decode(_))));
        }
        let mut longer = bytes.clone();
        longer.push(extra);
        prop_assert!(matches!(Record::decode_with_id(record.id, &longer), Err(Error::Decode(_))));
    }

    #[test]
    fn flipped_bytes_never_panic(record in any_record(), at in any::<prop::sample::Index>(), flip in 1..=255u8) {
        let mut bytes = record.encode().unwrap();
        let at = at.index(bytes.len());
        bytes[at] ^= flip;
        if let Err(err) = Record::decode(&bytes) {
            prop_assert!(matches!(err, Error::Decode(_)));
        }
    }

    #[test]
    fn typed_get_of_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut record = Record::new(OffsetDateTime::UNIX_EPOCH);
        record.insert_raw("k", bytes);
        let _ = record.get::<u64>("k");
        let _ = record.get::<String>("k");
        let _ = record.get::<Vec<String>>("k");
        let _ = record.get::<BTreeMap<String, Vec<u32>>>("k");
        let _ = record.get::<Profile>("k");
        let _ = record.get::<(bool, char, f64, Option<i8>)>("k");
    }

    #[test]
    fn typed_values_round_trip(profile in any_profile()) {
        let mut record = Record::new(OffsetDateTime::UNIX_EPOCH);
        record.insert("profile", &profile).unwrap();
        prop_assert_eq!(record.get::<Profile>("profile").unwrap(), Some(profile));
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Profile {
    user_id: u64,
    name: String,
    roles: Vec<String>,
    admin: bool,
}

fn any_profile() -> impl Strategy<Value = Profile> {
    (
        any::<u64>(),
        ".{0,20}",
        proptest::collection::vec("[a-z]{1,8}", 0..4),
        any::<bool>(),
    )
        .prop_map(|(user_id, name, roles, admin)| Profile {
            user_id,
            name,
            roles,
            admin,
        })
}

#[test]
fn a_value_read_as_the_wrong_type_is_a_decode_error() {
    let mut record = Record::new(OffsetDateTime::UNIX_EPOCH);
    record.insert("name", "alice").unwrap();
    record.insert("big", &300u64).unwrap();
    record.insert("roles", &vec!["admin", "editor"]).unwrap();
    record
        .insert(
            "profile",
            &Profile {
                user_id: 1,
                name: "alice".into(),
                roles: vec![],
                admin: true,
            },
        )
        .unwrap();
    // Each is a Decode error: bytes left over, bytes missing, or not valid for the type.
    assert!(matches!(record.get::<u64>("name"), Err(Error::Decode(_))));
    assert!(matches!(record.get::<u8>("big"), Err(Error::Decode(_))));
    assert!(matches!(record.get::<String>("big"), Err(Error::Decode(_))));
    assert!(matches!(record.get::<bool>("roles"), Err(Error::Decode(_))));
    assert!(matches!(
        record.get::<Profile>("name"),
        Err(Error::Decode(_))
    ));
    assert!(matches!(
        record.get::<Vec<u64>>("profile"),
        Err(Error::Decode(_))
    ));
    // The right types still read.
    assert_eq!(
        record.get::<String>("name").unwrap().as_deref(),
        Some("alice")
    );
    assert_eq!(record.get::<u64>("big").unwrap(), Some(300));
}

#[test]
fn unknown_versions_and_oversized_input_are_rejected() {
    let record = Record::new(OffsetDateTime::UNIX_EPOCH);
    let mut bytes = record.encode().unwrap();
    bytes[0] = 7;
    let err = Record::decode(&bytes).unwrap_err();
    assert!(matches!(err, Error::Decode(_)));
    assert_eq!(
        err.report(),
        "failed to decode session data: record format version 7 where 3 was expected"
    );
    // The owned format with no owner after the date, or a name that is not one.
    bytes[0] = Record::FORMAT_VERSION_OWNED;
    assert!(matches!(Record::decode(&bytes), Err(Error::Decode(_))));
    let mut owned = Record::new(OffsetDateTime::UNIX_EPOCH);
    owned.ownership = Some(Ownership::new(
        Owner::new("alice").unwrap(),
        OffsetDateTime::UNIX_EPOCH,
    ));
    let good = owned.encode().unwrap();
    assert_eq!(Record::decode(&good).unwrap(), owned);
    let name_at = good.windows(5).position(|w| w == b"alice").unwrap();
    for (at, byte) in [(name_at, b'\n'), (name_at - 1, 0), (name_at - 1, 200)] {
        let mut bad = good.clone();
        bad[at] = byte;
        assert!(
            matches!(Record::decode(&bad), Err(Error::Decode(_))),
            "{at} {byte}"
        );
    }
    for len in 0..good.len() {
        assert!(Record::decode(&good[..len]).is_err(), "truncated to {len}");
    }
    assert!(matches!(
        Record::decode_with_id(record.id, &bytes),
        Err(Error::Decode(_))
    ));

    let huge = vec![Record::FORMAT_VERSION; Record::MAX_ENCODED_LEN + 1];
    assert!(matches!(Record::decode(&huge), Err(Error::Decode(_))));
    assert!(matches!(Record::decode(&[]), Err(Error::Decode(_))));
    assert!(matches!(
        Record::decode_with_id(record.id, &[]),
        Err(Error::Decode(_))
    ));
}

#[test]
fn the_two_formats_are_never_confused() {
    let mut record = Record::new(OffsetDateTime::now_utc());
    record.insert("user", &7u64).unwrap();
    let with_id = record.encode().unwrap();
    let without_id = record.encode_without_id().unwrap();
    assert_eq!(with_id.len(), without_id.len() + 16);
    assert!(matches!(Record::decode(&without_id), Err(Error::Decode(_))));
    assert!(matches!(
        Record::decode_with_id(record.id, &with_id),
        Err(Error::Decode(_))
    ));
    assert!(!without_id.windows(16).any(|w| w == record.id.to_bytes()));
}

#[test]
fn a_record_too_large_to_decode_is_not_encoded() {
    let mut record = Record::new(OffsetDateTime::UNIX_EPOCH);
    record
        .insert("blob", &vec![0u8; Record::MAX_ENCODED_LEN])
        .unwrap();
    assert!(matches!(record.encode(), Err(Error::Encode(_))));
}

#[test]
fn duplicate_keys_are_rejected() {
    // Two entries under one key, written by hand in the wire format.
    let mut bytes = vec![Record::FORMAT_VERSION];
    bytes.extend([0u8; 16]); // id
    bytes.push(0); // expiry: zigzag varint 0
    bytes.push(2); // two entries
    for _ in 0..2 {
        bytes.extend([1, b'k', 1, 7]); // key "k", value [7]
    }
    let err = Record::decode(&bytes).unwrap_err();
    assert!(err.report().contains("duplicate key"), "{}", err.report());
    // With the count at one and the second entry gone, the same bytes decode.
    bytes[18] = 1;
    bytes.truncate(bytes.len() - 4);
    assert_eq!(
        Record::decode(&bytes).unwrap().get_raw("k"),
        Some(&[7u8][..])
    );
}

#[test]
fn tower_sessions_id_text_parses_and_prints_back() {
    // tower-sessions prints ids as unpadded base64url of the i128's little-endian
    // bytes; this one is the text of i128 value 1.
    let text = "AQAAAAAAAAAAAAAAAAAAAA";
    let id: Id = text.parse().unwrap();
    assert_eq!(id.to_bytes(), 1u128.to_le_bytes());
    assert_eq!(id.to_string(), text);
}
