-- shardlease-worker V4: the legacy `shard` column is kept by a trigger instead of being a
-- stored generated column.
--
-- PostgreSQL computes a stored generated column again on every UPDATE of the row, whatever
-- the UPDATE sets, and prepares its expression (inlining shardlease.shard_of, a SHA-256 of
-- the id) once per statement. Every tick updates its items, so every tick paid for a value
-- that never changes: measured with pgbench on 1,000 items, a tick's UPDATE of 5 of them
-- cost 0.76 ms of server CPU with the generated column and 0.65 ms with this trigger, which
-- fires only when an id is inserted or changed. Readers see the same column and values;
-- workers of builds before the hash ranges keep using it.
--
-- DROP EXPRESSION keeps the stored values and does not rewrite the table (a brief ACCESS
-- EXCLUSIVE lock).

ALTER TABLE public.work_items ALTER COLUMN shard DROP EXPRESSION;

CREATE OR REPLACE FUNCTION shardlease_worker.set_work_items_shard() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
  NEW.shard := shardlease.shard_of(NEW.id);
  RETURN NEW;
END
$$;
COMMENT ON FUNCTION shardlease_worker.set_work_items_shard() IS
  'Trigger of public.work_items: sets the legacy shard column from the id (shardlease.shard_of).';

-- Also on an UPDATE that sets shard itself: the column stays what the id says.
CREATE TRIGGER shard_set BEFORE INSERT OR UPDATE OF id, shard ON public.work_items
  FOR EACH ROW EXECUTE FUNCTION shardlease_worker.set_work_items_shard();

COMMENT ON COLUMN public.work_items.shard IS
  'Legacy virtual shard 0..1023: shardlease.shard_of(id), set by the trigger shard_set. Used by workers of builds before the hash ranges (assignment protocol 1); drop it once none runs.';
