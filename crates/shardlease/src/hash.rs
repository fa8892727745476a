//! Stable 64-bit key hashes.
//!
//! Every function here is a fixed, documented formula: the results are the same in every
//! process, on every platform, in every version of this crate, and in SQL. Nothing here uses
//! [`std::collections::hash_map::DefaultHasher`], whose output is allowed to change.
//!
//! The committed test vectors in `crates/shardlease/tests/vectors/hash_vectors.json` pin the
//! values; the unit tests check the Rust functions against them, and the database tests check
//! the SQL twins against the same file.
//!
//! | Rust | SQL twin |
//! |---|---|
//! | [`uuid_key_i64`] | `('x' \|\| encode(substr(sha256(uuid_send(id)), 1, 8), 'hex'))::bit(64)::bigint` |
//! | [`str_key_i64`] | `('x' \|\| encode(substr(sha256(convert_to(s, 'UTF8')), 1, 8), 'hex'))::bit(64)::bigint` |
//! | [`shard_of_uuid`] | `(shardlease.uuid_key(id) & 1023)::int` |
//! | [`uuid_hash`] | `shardlease.uuid_hash(id)`: `('x' \|\| encode(substr(sha256(uuid_send(id)), 1, 4), 'hex'))::bit(32)::int` |
//! | [`str_hash`] | `shardlease.str_hash(s)`: the same over `convert_to(s, 'UTF8')` |
//! | [`int_hash`] | `shardlease.int_hash(v)`: the same over `int8send(v)` (8 bytes, big-endian) |
//!
//! The 32-bit hashes ([`uuid_hash`], [`str_hash`], [`int_hash`]) are what a table stores per
//! row (a plain `integer` column, filled by a trigger) so that members can own *ranges* of the
//! hash space: see [`crate::shard_table`].

use sha2::{Digest, Sha256};

/// The 64-bit golden-ratio constant `0x9E37_79B9_7F4A_7C15` (⌊2⁶⁴/φ⌋, made odd), the
/// increment of SplitMix64. [`mix`] multiplies the probe index by it.
pub const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// The number of virtual shards that [`shard_of_uuid`] maps ids to. A power of two.
///
/// The legacy layout: with one jump hash per shard, 1,024 shards balance items poorly beyond a
/// few dozen members. New tables store [`uuid_hash`] and own hash ranges through the
/// [`shard_table`](crate::shard_table).
pub const SHARDS: u32 = 1024;

/// The SplitMix64 finalizer: a bijective 64-bit mixer with good avalanche.
///
/// In wrapping (mod 2⁶⁴) arithmetic:
///
/// ```text
/// z = x
/// z = (z ^ (z >> 30)) * 0xBF58_476D_1CE4_E5B9
/// z = (z ^ (z >> 27)) * 0x94D0_49BB_1331_11EB
/// return z ^ (z >> 31)
/// ```
///
/// It is a bijection, so distinct inputs give distinct outputs, and `mix64(0) == 0`.
///
/// ```
/// use shardlease::hash::mix64;
/// assert_eq!(mix64(0), 0);
/// assert_eq!(mix64(1), 0x5692_161d_100b_05e5);
/// ```
#[must_use]
pub const fn mix64(x: u64) -> u64 {
    let mut z = x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The re-probe mixer of the assignment: `mix(key, i) = mix64(key ^ i.wrapping_mul(GOLDEN))`.
///
/// For a fixed key, distinct `i` give distinct outputs (`GOLDEN` is odd, so `i ↦ i·GOLDEN`
/// is a bijection mod 2⁶⁴, and so are `xor` with `key` and [`mix64`]).
/// Note that `mix(key, 0) == mix64(key)`; the assignment only uses `i >= 1`.
///
/// ```
/// use shardlease::hash::{mix, mix64, GOLDEN};
/// let key = 42;
/// assert_eq!(mix(key, 3), mix64(key ^ 3u64.wrapping_mul(GOLDEN)));
/// ```
#[must_use]
pub const fn mix(key: u64, i: u64) -> u64 {
    mix64(key ^ i.wrapping_mul(GOLDEN))
}

/// The first 8 bytes of SHA-256 over `bytes`, read as a big-endian `u64`.
fn sha256_prefix_u64(bytes: &[u8]) -> u64 {
    let digest = Sha256::digest(bytes);
    let mut prefix = [0u8; 8];
    prefix.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(prefix)
}

/// The stable key of a UUID: the first 8 bytes, read big-endian, of SHA-256 over the 16 raw
/// bytes of the UUID (its RFC 9562 byte order, as [`uuid::Uuid::as_bytes`] and PostgreSQL's
/// `uuid_send` give them).
///
/// [`uuid_key_i64`] is the same 64 bits as a signed integer, which is what SQL computes.
///
/// ```
/// use shardlease::hash::uuid_key;
/// use uuid::Uuid;
/// assert_eq!(uuid_key(&Uuid::nil()), 0x374708fff7719dd5);
/// ```
#[must_use]
pub fn uuid_key(id: &uuid::Uuid) -> u64 {
    sha256_prefix_u64(id.as_bytes())
}

/// [`uuid_key`] reinterpreted as a signed `bigint` (same bits, two's complement).
///
/// SQL twin, which must give the same value for every id:
///
/// ```sql
/// ('x' || encode(substr(sha256(uuid_send(id)), 1, 8), 'hex'))::bit(64)::bigint
/// ```
///
/// ```
/// use shardlease::hash::{uuid_key, uuid_key_i64};
/// use uuid::Uuid;
/// let id = Uuid::max();
/// assert_eq!(uuid_key_i64(&id), uuid_key(&id) as i64);
/// ```
#[must_use]
pub fn uuid_key_i64(id: &uuid::Uuid) -> i64 {
    uuid_key(id) as i64
}

/// The stable key of a string: the first 8 bytes, read big-endian, of SHA-256 over its UTF-8
/// bytes.
///
/// SQL twin (as a signed `bigint`, see [`str_key_i64`]):
///
/// ```sql
/// ('x' || encode(substr(sha256(convert_to(s, 'UTF8')), 1, 8), 'hex'))::bit(64)::bigint
/// ```
///
/// ```
/// use shardlease::hash::str_key;
/// // SHA-256("") = e3b0c44298fc1c14...
/// assert_eq!(str_key(""), 0xe3b0c44298fc1c14);
/// ```
#[must_use]
pub fn str_key(s: &str) -> u64 {
    sha256_prefix_u64(s.as_bytes())
}

/// [`str_key`] reinterpreted as a signed `bigint` (same bits, two's complement), as SQL
/// computes it.
///
/// ```
/// use shardlease::hash::{str_key, str_key_i64};
/// assert_eq!(str_key_i64("work_items"), str_key("work_items") as i64);
/// ```
#[must_use]
pub fn str_key_i64(s: &str) -> i64 {
    str_key(s) as i64
}

/// The virtual shard of an id: the low 10 bits of [`uuid_key`], in `0..SHARDS`.
///
/// SQL twin: `(shardlease.uuid_key(id) & 1023)::int`, where `shardlease.uuid_key` is the SQL
/// twin of [`uuid_key_i64`] (the low bits of the signed and unsigned forms are the same).
///
/// ```
/// use shardlease::hash::{shard_of_uuid, uuid_key, SHARDS};
/// use uuid::Uuid;
/// let id = Uuid::nil();
/// assert_eq!(shard_of_uuid(&id), (uuid_key(&id) % 1024) as u32);
/// assert!(shard_of_uuid(&id) < SHARDS);
/// ```
#[must_use]
pub fn shard_of_uuid(id: &uuid::Uuid) -> u32 {
    (uuid_key(id) & (u64::from(SHARDS) - 1)) as u32
}

/// The first 4 bytes of SHA-256 over `bytes`, read as a big-endian `i32` (two's complement).
fn sha256_prefix_i32(bytes: &[u8]) -> i32 {
    let digest = Sha256::digest(bytes);
    let mut prefix = [0u8; 4];
    prefix.copy_from_slice(&digest[..4]);
    i32::from_be_bytes(prefix)
}

/// The stored 32-bit hash of a UUID: the first 4 bytes, read big-endian as a signed `integer`,
/// of SHA-256 over the 16 raw bytes of the UUID. These are the high 32 bits of [`uuid_key`].
///
/// SQL twin (`shardlease.uuid_hash(uuid)`, from schema version 5):
///
/// ```sql
/// ('x' || encode(substr(sha256(uuid_send(id)), 1, 4), 'hex'))::bit(32)::int
/// ```
///
/// ```
/// use shardlease::hash::{uuid_hash, uuid_key};
/// use uuid::Uuid;
/// let id = Uuid::nil();
/// assert_eq!(uuid_hash(&id), 0x374708ff);
/// assert_eq!(uuid_hash(&id), (uuid_key(&id) >> 32) as u32 as i32);
/// ```
#[must_use]
pub fn uuid_hash(id: &uuid::Uuid) -> i32 {
    sha256_prefix_i32(id.as_bytes())
}

/// The stored 32-bit hash of a string: the first 4 bytes, read big-endian as a signed
/// `integer`, of SHA-256 over its UTF-8 bytes (the high 32 bits of [`str_key`]).
///
/// SQL twin: `shardlease.str_hash(text)`.
///
/// ```
/// use shardlease::hash::str_hash;
/// // SHA-256("") = e3b0c442...
/// assert_eq!(str_hash(""), 0xe3b0c442_u32 as i32);
/// ```
#[must_use]
pub fn str_hash(s: &str) -> i32 {
    sha256_prefix_i32(s.as_bytes())
}

/// The stored 32-bit hash of a 64-bit integer key: the first 4 bytes, read big-endian as a
/// signed `integer`, of SHA-256 over its 8 big-endian bytes (PostgreSQL's `int8send`).
/// `smallint` and `integer` keys are widened to `bigint` first.
///
/// SQL twin: `shardlease.int_hash(bigint)`.
///
/// ```
/// use shardlease::hash::int_hash;
/// assert_eq!(int_hash(1), int_hash(1)); // stable
/// assert_ne!(int_hash(1), int_hash(2));
/// ```
#[must_use]
pub fn int_hash(v: i64) -> i32 {
    sha256_prefix_i32(&v.to_be_bytes())
}

/// The assignment key of a virtual shard: `mix64(shard)`.
///
/// Jump hash wants well-spread 64-bit keys; small consecutive integers are not, so shards are
/// mixed first. This is the key that [`crate::assignment::Assignment::shard_owner`] uses.
///
/// ```
/// use shardlease::hash::{mix64, shard_key};
/// assert_eq!(shard_key(7), mix64(7));
/// ```
#[must_use]
pub const fn shard_key(shard: u32) -> u64 {
    mix64(shard as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    /// The committed test vectors; the source of truth.
    const VECTORS: &str = include_str!("../tests/vectors/hash_vectors.json");

    fn vectors() -> Value {
        serde_json::from_str(VECTORS).expect("hash_vectors.json is valid JSON")
    }

    fn hex_u64(v: &Value) -> u64 {
        let s = v.as_str().expect("hex field is a string");
        assert_eq!(s.len(), 16, "hex fields are 16 lowercase digits: {s:?}");
        assert_eq!(s, s.to_ascii_lowercase(), "hex fields are lowercase: {s:?}");
        u64::from_str_radix(s, 16).expect("valid hex")
    }

    fn array<'a>(v: &'a Value, name: &str) -> &'a Vec<Value> {
        v[name]
            .as_array()
            .unwrap_or_else(|| panic!("{name} is an array"))
    }

    #[test]
    fn uuid_keys_match_vectors() {
        let v = vectors();
        let cases = array(&v, "uuid_keys");
        assert!(cases.len() >= 20);
        for case in cases {
            let id: uuid::Uuid = case["id"].as_str().unwrap().parse().unwrap();
            let hex = hex_u64(&case["key_u64_hex"]);
            let signed = case["key_i64"].as_i64().unwrap();
            let shard = case["shard"].as_u64().unwrap();
            assert_eq!(uuid_key(&id), hex, "uuid_key({id})");
            assert_eq!(uuid_key_i64(&id), signed, "uuid_key_i64({id})");
            assert_eq!(u64::from(shard_of_uuid(&id)), shard, "shard_of_uuid({id})");
            // The SQL twin takes the low bits of the signed key.
            assert_eq!((signed & 1023) as u64, shard);
        }
    }

    #[test]
    fn str_keys_match_vectors() {
        let v = vectors();
        let cases = array(&v, "str_keys");
        assert!(cases.len() >= 10);
        for case in cases {
            let s = case["s"].as_str().unwrap();
            assert_eq!(str_key(s), hex_u64(&case["key_u64_hex"]), "str_key({s:?})");
            assert_eq!(str_key_i64(s), case["key_i64"].as_i64().unwrap());
        }
    }

    #[test]
    fn mixers_match_vectors() {
        let v = vectors();
        for case in array(&v, "mix64") {
            let x = hex_u64(&case["x_hex"]);
            assert_eq!(mix64(x), hex_u64(&case["out_hex"]), "mix64({x:#x})");
        }
        for case in array(&v, "mix") {
            let key = hex_u64(&case["key_hex"]);
            let i = case["i"].as_u64().unwrap();
            assert_eq!(mix(key, i), hex_u64(&case["out_hex"]), "mix({key:#x}, {i})");
        }
    }

    /// Independent anchors, not taken from the vector file: the published SplitMix64 output and
    /// SHA-256 digests computed elsewhere.
    #[test]
    fn known_answers() {
        // SplitMix64 seeded with 0 returns mix64(GOLDEN) first: 0xe220a8397b1dcdaf.
        assert_eq!(mix64(GOLDEN), 0xe220_a839_7b1d_cdaf);
        // SHA-256("abc") = ba7816bf8f01cfea...
        assert_eq!(str_key("abc"), 0xba78_16bf_8f01_cfea);
        // SHA-256 of 16 zero bytes = 374708fff7719dd5...
        assert_eq!(uuid_key(&uuid::Uuid::nil()), 0x3747_08ff_f771_9dd5);
    }

    #[test]
    fn hash32_match_vectors() {
        let v = vectors();
        let cases = array(&v, "hash32");
        assert!(cases.len() >= 40);
        for case in cases {
            let want = case["hash"].as_i64().unwrap();
            let got = if let Some(id) = case.get("uuid") {
                uuid_hash(&id.as_str().unwrap().parse().unwrap())
            } else if let Some(s) = case.get("s") {
                str_hash(s.as_str().unwrap())
            } else {
                int_hash(case["int"].as_i64().unwrap())
            };
            assert_eq!(i64::from(got), want, "{case}");
        }
    }

    /// The 32-bit hashes are the high halves of the 64-bit keys (one SHA-256 prefix).
    #[test]
    fn hash32_is_the_high_half_of_the_key() {
        for s in ["", "a", "work_items", "日本語"] {
            assert_eq!(str_hash(s), (str_key(s) >> 32) as u32 as i32);
        }
        for n in 0..64u128 {
            let id =
                uuid::Uuid::from_u128(n.wrapping_mul(0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835));
            assert_eq!(uuid_hash(&id), (uuid_key(&id) >> 32) as u32 as i32);
        }
        // SHA-256 of the 8 bytes 00..01 starts cd2662154e6d76b2...
        assert_eq!(int_hash(1), 0xcd26_6215_u32 as i32);
    }

    #[test]
    fn shard_key_is_mix64() {
        for s in [0, 1, 2, 1023, u32::MAX] {
            assert_eq!(shard_key(s), mix64(u64::from(s)));
        }
    }
}
