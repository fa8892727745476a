-- shardlease-worker V3: the stored 32-bit hash of each item, which members own by ranges
-- (balanced at every group size; the old `shard` column gave 1,024 shards, too few beyond a
-- few dozen members).
--
-- Needs shardlease schema version 5. This step only takes brief locks: it adds the nullable
-- column `key_hash`, a trigger that fills it for new rows (and, until the backfill is
-- validated, for every updated row), and the constraint `key_hash_is_set` NOT VALID.
-- `shardlease-worker migrate` then backfills the existing rows in small transactions,
-- builds the index CONCURRENTLY and validates the constraint (shardlease::live_table);
-- by hand, see that module's docs or the README. The old `shard` column and its index stay:
-- workers of earlier builds keep using them until they are all gone.

SELECT shardlease.add_key_hash('public.work_items'::regclass, 'id', 'key_hash');

COMMENT ON COLUMN public.work_items.key_hash IS
  'Stored 32-bit hash of id: shardlease.uuid_hash(id), set by the trigger key_hash_set. Members own ranges of it (the balanced shard table of 65,536 hash shards).';
COMMENT ON COLUMN public.work_items.shard IS
  'Legacy virtual shard 0..1023: shardlease.shard_of(id). Used by workers of builds before the hash ranges (assignment protocol 1); drop it once none runs.';

-- Every item is updated every second, so every page sees about as many new row versions a
-- second as it holds rows. At fillfactor 80 a page fills within a second, and every tick
-- pays for pruning it first (measured with 200 workers on 1,000 items: 1.05 ms per tick's
-- UPDATE, against 0.43 ms at 50). Room for a second version of every row keeps updates HOT
-- and pruning rare. It applies to pages written from now on: `VACUUM FULL public.work_items`
-- (an ACCESS EXCLUSIVE lock for the rewrite) applies it to the rows already there.
ALTER TABLE public.work_items SET (fillfactor = 50);
