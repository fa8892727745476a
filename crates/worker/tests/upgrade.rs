//! Upgrading a deployment whose schema was applied by hand (`psql -f`, no history) and whose
//! `work_items` still has only the 1,024-shard layout: `shardlease-worker migrate` recognises
//! what is there, adds `key_hash` while the old layout keeps being ticked, and the new workers
//! then tick every item.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{wait_settled, TestDb};

const ITEMS: i64 = 20_000;

fn migration(dir: &str, file: &str) -> String {
    std::fs::read_to_string(format!(
        "{}/../../migrations/{dir}/{file}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_upgrades_a_hand_made_schema_while_the_old_layout_is_ticked() {
    let db = TestDb::empty().await;
    let c = db.client().await;
    // What an operator of the first release ran by hand: no history tables.
    for (dir, file) in [
        ("shardlease", "V1__membership.sql"),
        ("shardlease", "V2__constant_cost.sql"),
        ("work_items", "V1__work_items.sql"),
    ] {
        c.batch_execute(&migration(dir, file))
            .await
            .unwrap_or_else(|e| panic!("psql -f {dir}/{file}: {e}"));
    }
    c.batch_execute(&format!(
        "INSERT INTO public.work_items (value) SELECT 0 FROM generate_series(1, {ITEMS})"
    ))
    .await
    .unwrap();

    // An old worker keeps ticking its shards of the old layout the whole time.
    let stop = Arc::new(AtomicBool::new(false));
    let old = {
        let (stop, client) = (stop.clone(), db.client().await);
        tokio::spawn(async move {
            let all: Vec<i32> = (0..1024).collect();
            let (mut ticks, mut failures) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match client
                    .execute(
                        "UPDATE public.work_items SET value = value + 1, currentworker = 'old', \
                         updated_at = now() WHERE shard = ANY($1)",
                        &[&all],
                    )
                    .await
                {
                    Ok(n) => assert_eq!(n as i64, ITEMS),
                    Err(e) => {
                        failures.push(format!("{e:?}"));
                        break;
                    }
                }
                ticks += 1;
            }
            (ticks, failures)
        })
    };

    let out = db.cli(&["migrate"]).await;
    assert!(out.success(), "migrate: {out}");
    for needle in [
        "shardlease V1 (found applied by hand)",
        "shardlease V2 (found applied by hand)",
        "work_items V1 (found applied by hand)",
        "V3__key_hash",
        "work_items.key_hash: backfill, index, validate, settle",
    ] {
        assert!(out.stdout.contains(needle), "{needle:?} in: {out}");
    }
    stop.store(true, Ordering::Relaxed);
    let (ticks, failures) = old.await.unwrap();
    assert!(
        failures.is_empty(),
        "the old layout kept working: {failures:?}"
    );
    assert!(
        ticks >= 2,
        "the old worker ticked during the migration: {ticks}"
    );

    let versions: Vec<i32> = c
        .query(
            "SELECT version FROM shardlease.schema_history ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(versions.first(), Some(&1));
    assert_eq!(
        versions.last(),
        Some(&shardlease::migrate::required_version())
    );
    let ready: bool = c
        .query_one(
            "SELECT ready FROM shardlease.key_hash_status('public.work_items') s \
             WHERE NOT EXISTS (SELECT 1 FROM public.work_items \
                               WHERE key_hash IS DISTINCT FROM shardlease.uuid_hash(id))",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ready);
    // The legacy shard column (kept by a trigger since work_items V4, no longer generated)
    // still says what the id does: for rows inserted after the migration, and after an
    // UPDATE that sets it.
    c.batch_execute(
        "INSERT INTO public.work_items (value) SELECT 0 FROM generate_series(1, 10); \
         UPDATE public.work_items SET shard = -1 \
          WHERE id = (SELECT id FROM public.work_items LIMIT 1)",
    )
    .await
    .unwrap();
    let wrong: i64 = c
        .query_one(
            "SELECT count(*) FROM public.work_items \
             WHERE shard IS DISTINCT FROM shardlease.shard_of(id)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        wrong, 0,
        "rows whose legacy shard is not shardlease.shard_of(id)"
    );
    let again = db.cli(&["migrate"]).await;
    assert!(
        again.success() && again.stdout.contains("already up to date"),
        "{again}"
    );

    // The new workers tick every item, on the new layout.
    let _workers = [db.worker("n1", &[]), db.worker("n2", &[])];
    wait_settled(&c, &["n1", "n2"], Duration::from_secs(60)).await;
}
