//! The SQL twins of the Rust functions agree with them: key hashes against the committed
//! test vectors, and the slot-count rule against `assignment::slot_count_after_leaves`.

mod common;

use common::TestDb;
use shardlease::{assignment, hash};

fn vectors() -> serde_json::Value {
    serde_json::from_str(include_str!("vectors/hash_vectors.json")).expect("vectors parse")
}

fn hex(v: &serde_json::Value) -> u64 {
    u64::from_str_radix(v.as_str().expect("hex string"), 16).expect("hex")
}

#[tokio::test]
async fn sql_key_hashes_match_the_committed_vectors() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    let v = vectors();
    let uuids = v["uuid_keys"].as_array().unwrap();
    assert!(uuids.len() >= 20);
    for case in uuids {
        let id: uuid::Uuid = case["id"].as_str().unwrap().parse().unwrap();
        let row = c
            .query_one(
                "SELECT shardlease.uuid_key($1), shardlease.shard_of($1)",
                &[&id],
            )
            .await
            .unwrap();
        let (key, shard): (i64, i32) = (row.get(0), row.get(1));
        assert_eq!(
            key as u64,
            hex(&case["key_u64_hex"]),
            "uuid_key({id}) in SQL"
        );
        assert_eq!(
            key,
            case["key_i64"].as_i64().unwrap(),
            "uuid_key({id}) as bigint"
        );
        assert_eq!(
            shard as u64,
            case["shard"].as_u64().unwrap(),
            "shard_of({id}) in SQL"
        );
        assert_eq!(
            hash::uuid_key(&id),
            key as u64,
            "Rust and SQL agree on {id}"
        );
    }
    for case in v["str_keys"].as_array().unwrap() {
        let s = case["s"].as_str().unwrap();
        let key: i64 = c
            .query_one("SELECT shardlease.str_key($1)", &[&s])
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            key as u64,
            hex(&case["key_u64_hex"]),
            "str_key({s:?}) in SQL"
        );
        assert_eq!(hash::str_key(s), key as u64);
    }
}

#[tokio::test]
async fn random_uuids_get_the_same_shard_in_sql_and_rust() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    let rows = c
        .query(
            "SELECT id, shardlease.shard_of(id) FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, 2000)) s",
            &[],
        )
        .await
        .unwrap();
    for r in rows {
        let id: uuid::Uuid = r.get(0);
        let shard: i32 = r.get(1);
        assert_eq!(hash::shard_of_uuid(&id), shard as u32, "shard of {id}");
    }
}

#[tokio::test]
async fn sql_slot_count_rule_matches_rust() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    // Every subset of departures from S = 0..=7 (255 subsets of 8 slots at most).
    for s in 0u32..=7 {
        for mask in 0u32..(1 << s) {
            let departed: Vec<u32> = (0..s).filter(|i| mask & (1 << i) != 0).collect();
            let as_sql: Vec<i32> = departed.iter().map(|&d| d as i32).collect();
            let sql: i32 = c
                .query_one(
                    "SELECT shardlease.slot_count_after($1, $2)",
                    &[&(s as i32), &as_sql],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(
                sql as u32,
                assignment::slot_count_after_leaves(s, &departed),
                "S={s} departed={departed:?}"
            );
        }
    }
}

#[tokio::test]
async fn sql_stored_hashes_match_the_committed_vectors() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    let v = vectors();
    let cases = v["hash32"].as_array().unwrap();
    assert!(cases.len() >= 40);
    for case in cases {
        let want = case["hash"].as_i64().unwrap();
        let (sql, rust): (i32, i32) = if let Some(id) = case.get("uuid") {
            let id: uuid::Uuid = id.as_str().unwrap().parse().unwrap();
            let row = c
                .query_one("SELECT shardlease.uuid_hash($1)", &[&id])
                .await
                .unwrap();
            (row.get(0), hash::uuid_hash(&id))
        } else if let Some(s) = case.get("s") {
            let s = s.as_str().unwrap();
            let row = c
                .query_one("SELECT shardlease.str_hash($1)", &[&s])
                .await
                .unwrap();
            (row.get(0), hash::str_hash(s))
        } else {
            let n = case["int"].as_i64().unwrap();
            let row = c
                .query_one("SELECT shardlease.int_hash($1)", &[&n])
                .await
                .unwrap();
            (row.get(0), hash::int_hash(n))
        };
        assert_eq!(i64::from(sql), want, "SQL twin of {case}");
        assert_eq!(rust, sql, "Rust and SQL agree on {case}");
    }
}

/// The worker's path end to end: 20,000 random ids hashed by SQL, selected by SQL with the
/// `BETWEEN` join on each member's hash ranges, are exactly the ids the Rust table gives each
/// member, for a full view and for one with vacancies.
#[tokio::test]
async fn sql_range_selection_matches_the_rust_table() {
    let db = TestDb::migrated().await;
    let c = db.client().await;
    c.batch_execute(
        "CREATE TABLE items (id uuid PRIMARY KEY, key_hash integer NOT NULL);
         INSERT INTO items SELECT id, shardlease.uuid_hash(id)
           FROM (SELECT gen_random_uuid() AS id FROM generate_series(1, 20000)) s;
         CREATE INDEX ON items (key_hash); ANALYZE items;",
    )
    .await
    .unwrap();
    let rows = c
        .query("SELECT id, key_hash FROM items", &[])
        .await
        .unwrap();
    for (s, live) in [
        (7u32, vec![0u32, 1, 2, 3, 4, 5, 6]),
        (9, vec![0, 2, 3, 7, 8]),
    ] {
        let t = assignment::Assignment::new(s, live.iter().copied())
            .unwrap()
            .shard_table(shardlease::shard_table::HASH_SHARDS)
            .unwrap();
        let mut seen = 0;
        for &slot in &live {
            let ranges = t.hash_ranges(slot);
            let mut sql: Vec<uuid::Uuid> = c
                .query(
                    "SELECT i.id FROM items i JOIN unnest($1::int4[], $2::int4[]) AS r(lo, hi) \
                     ON i.key_hash BETWEEN r.lo AND r.hi",
                    &[&ranges.lower_bounds(), &ranges.upper_bounds()],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get(0))
                .collect();
            sql.sort_unstable();
            let mut rust: Vec<uuid::Uuid> = rows
                .iter()
                .filter(|r| {
                    let id: uuid::Uuid = r.get(0);
                    assert_eq!(r.get::<_, i32>(1), hash::uuid_hash(&id));
                    t.hash_owner(hash::uuid_hash(&id)) == Some(slot)
                })
                .map(|r| r.get(0))
                .collect();
            rust.sort_unstable();
            assert_eq!(sql, rust, "slot {slot} of S={s}, live {live:?}");
            seen += sql.len();
        }
        assert_eq!(seen, rows.len(), "every id has exactly one owner");
    }
}
