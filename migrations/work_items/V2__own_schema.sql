-- shardlease-worker V2: the worker's objects move to a schema of their own,
-- shardlease_worker, out of the library's shardlease schema.
--
-- `shardlease-worker migrate` first moves its history table there too (from
-- shardlease.worker_schema_history to shardlease_worker.schema_history) before it applies this.
-- A worker of an older build that starts after this migration fails its start-up check
-- (`shardlease.worker_schema_history does not exist`): run the new build.

CREATE SCHEMA IF NOT EXISTS shardlease_worker;
COMMENT ON SCHEMA shardlease_worker IS
  'shardlease-worker: the worker''s own objects (the worker_items view and the migration history); its items are public.work_items.';

ALTER VIEW shardlease.worker_items SET SCHEMA shardlease_worker;
