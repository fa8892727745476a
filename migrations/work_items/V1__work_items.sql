-- shardlease-worker V1: the work_items table, adopted if it already exists (no row is
-- touched), with a stored virtual shard and an updated_at stamp.
--
-- Needs the shardlease schema (migrations/shardlease) first. `shardlease-worker migrate`
-- applies both, recorded in shardlease.worker_schema_history; psql -f runs it as well.

CREATE TABLE IF NOT EXISTS public.work_items (
  id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
  value         integer NOT NULL DEFAULT 0,
  currentWorker varchar(255)
);

ALTER TABLE public.work_items
  ADD COLUMN IF NOT EXISTS shard integer GENERATED ALWAYS AS (shardlease.shard_of(id)) STORED,
  ADD COLUMN IF NOT EXISTS updated_at timestamptz;

-- Every tick rewrites each owned row: leave room on each page so that the updates stay HOT
-- (no indexed column changes). Applies to pages written from now on.
ALTER TABLE public.work_items SET (fillfactor = 80);

CREATE INDEX IF NOT EXISTS work_items_shard_idx ON public.work_items (shard);

COMMENT ON TABLE public.work_items IS
  'Items the shardlease workers tick: every second the owner of an item''s shard adds 1 to value and stamps currentWorker.';
COMMENT ON COLUMN public.work_items.id IS 'Item id.';
COMMENT ON COLUMN public.work_items.value IS 'Incremented by one on every tick of the item''s owner.';
COMMENT ON COLUMN public.work_items.currentworker IS 'Member id (pod name) of the worker that last ticked the item.';
COMMENT ON COLUMN public.work_items.shard IS
  'Virtual shard 0..1023: shardlease.shard_of(id), the low 10 bits of SHA-256(id). Owned through the shardlease assignment.';
COMMENT ON COLUMN public.work_items.updated_at IS 'Database time of the last tick (transaction start).';

CREATE VIEW shardlease.worker_items AS
SELECT w.currentworker AS member_id,
       m.slot,
       coalesce(m.alive, false) AS alive,
       count(*) AS items,
       count(DISTINCT w.shard) AS shards,
       max(w.updated_at) AS last_tick,
       date_trunc('milliseconds', clock_timestamp() - max(w.updated_at)) AS since_last_tick
  FROM public.work_items w
  LEFT JOIN shardlease.members m ON m.member_id = w.currentworker AND m.group_name = 'work_items'
 GROUP BY w.currentworker, m.slot, m.alive;
COMMENT ON VIEW shardlease.worker_items IS
  'Who last ticked how many work_items, per member of group work_items: alive, item and shard counts, last tick.';
COMMENT ON COLUMN shardlease.worker_items.member_id IS 'The worker that last ticked these items (NULL: never ticked).';
COMMENT ON COLUMN shardlease.worker_items.slot IS 'Its slot, when it is a member of group work_items.';
COMMENT ON COLUMN shardlease.worker_items.alive IS 'Whether it is an alive member of group work_items.';
COMMENT ON COLUMN shardlease.worker_items.items IS 'Items it last ticked.';
COMMENT ON COLUMN shardlease.worker_items.shards IS 'Distinct shards of those items.';
COMMENT ON COLUMN shardlease.worker_items.last_tick IS 'Its most recent tick.';
COMMENT ON COLUMN shardlease.worker_items.since_last_tick IS 'Time since that tick.';
