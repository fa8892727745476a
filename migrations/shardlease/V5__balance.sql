-- shardlease V5: balance at every group size. A stored 32-bit hash per row, which members
-- own by ranges (the balanced shard table, crates/shardlease/src/shard_table.rs), and the
-- tools that add it to a live table without rewriting it.
--
-- Plain SQL: `shardlease::migrate` applies it, `psql -v ON_ERROR_STOP=1 -f` runs it as well.
-- Nothing here touches a user's table; shardlease.add_key_hash does, when called.

-- The stored hashes, the SQL twins of shardlease::hash::{uuid_hash, str_hash, int_hash}
-- (the committed test vectors prove they agree): the first 4 bytes of SHA-256, big-endian,
-- as a signed integer.
CREATE FUNCTION shardlease.uuid_hash(p_id uuid) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
  SELECT ('x' || encode(substr(sha256(uuid_send(p_id)), 1, 4), 'hex'))::bit(32)::integer
$$;
COMMENT ON FUNCTION shardlease.uuid_hash(uuid) IS
  'Stored 32-bit hash of a uuid: the first 4 bytes, big-endian, of SHA-256 over its 16 bytes, as a signed integer (the high half of uuid_key). Same as shardlease::hash::uuid_hash. Members own ranges of it.';

CREATE FUNCTION shardlease.str_hash(p_s text) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
  SELECT ('x' || encode(substr(sha256(convert_to(p_s, 'UTF8')), 1, 4), 'hex'))::bit(32)::integer
$$;
COMMENT ON FUNCTION shardlease.str_hash(text) IS
  'Stored 32-bit hash of a string: the first 4 bytes, big-endian, of SHA-256 over its UTF-8 bytes, as a signed integer. Same as shardlease::hash::str_hash.';

CREATE FUNCTION shardlease.int_hash(p_v bigint) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
  SELECT ('x' || encode(substr(sha256(int8send(p_v)), 1, 4), 'hex'))::bit(32)::integer
$$;
COMMENT ON FUNCTION shardlease.int_hash(bigint) IS
  'Stored 32-bit hash of an integer key: the first 4 bytes, big-endian, of SHA-256 over its 8 big-endian bytes (int8send), as a signed integer. Same as shardlease::hash::int_hash.';

COMMENT ON FUNCTION shardlease.shard_of(uuid) IS
  'Legacy virtual shard (0..1023) of a uuid: the low 10 bits of uuid_key. Same as shardlease::hash::shard_of_uuid. Kept for tables that shard by it; new tables store uuid_hash and members own hash ranges (balanced at every group size).';

-- The hash expression of a key column, for trigger and backfill: which twin, by the
-- column's type. p_row is 'NEW' in the trigger, a table alias in the backfill.
CREATE FUNCTION shardlease.key_hash_expr(p_table regclass, p_key name, p_row text)
RETURNS text LANGUAGE plpgsql STABLE AS $$
DECLARE
  v_type regtype;
BEGIN
  SELECT a.atttypid::regtype INTO v_type
    FROM pg_attribute a
   WHERE a.attrelid = p_table AND a.attname = p_key AND a.attnum > 0 AND NOT a.attisdropped;
  IF NOT FOUND THEN
    RAISE EXCEPTION 'shardlease: table % has no column %', p_table, quote_ident(p_key)
      USING ERRCODE = 'undefined_column';
  END IF;
  RETURN CASE
    WHEN v_type = 'uuid'::regtype THEN format('shardlease.uuid_hash(%s.%I)', p_row, p_key)
    WHEN v_type IN ('text'::regtype, 'character varying'::regtype, 'character'::regtype, 'name'::regtype)
      THEN format('shardlease.str_hash(%s.%I::text)', p_row, p_key)
    WHEN v_type IN ('bigint'::regtype, 'integer'::regtype, 'smallint'::regtype)
      THEN format('shardlease.int_hash(%s.%I::bigint)', p_row, p_key)
    ELSE NULL
  END;
END
$$;
COMMENT ON FUNCTION shardlease.key_hash_expr(regclass, name, text) IS
  'Internal: the SQL that hashes key column p_key of row p_row: uuid_hash for uuid, str_hash for text, varchar, char and name, int_hash for smallint, integer and bigint; NULL for any other type.';

-- Step 1 of moving a live table onto a stored hash: everything that needs a lock on the
-- table, each brief and none of them a rewrite. Run it in a transaction with a bounded
-- lock_timeout (shardlease::live_table does, and retries).
CREATE FUNCTION shardlease.add_key_hash(p_table regclass, p_key name, p_column name DEFAULT 'key_hash')
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
  v_expr text := shardlease.key_hash_expr(p_table, p_key, 'NEW');
  v_nsp name;
  v_rel name;
  v_type regtype;
  v_function text;
  v_backfilled boolean;
BEGIN
  IF v_expr IS NULL THEN
    RAISE EXCEPTION 'shardlease: cannot hash column % of %: its type is not uuid, text, varchar, char, name, smallint, integer or bigint',
      quote_ident(p_key), p_table USING ERRCODE = 'datatype_mismatch';
  END IF;
  IF p_column = p_key THEN
    RAISE EXCEPTION 'shardlease: the hash column must differ from the key column %', quote_ident(p_key)
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- One installer per table at a time (they replace the same trigger function), and no
  -- writer meanwhile: the same lock CREATE TRIGGER takes anyway.
  EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', p_table);
  SELECT n.nspname, c.relname INTO v_nsp, v_rel
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = p_table;
  SELECT a.atttypid::regtype INTO v_type FROM pg_attribute a
   WHERE a.attrelid = p_table AND a.attname = p_column AND a.attnum > 0 AND NOT a.attisdropped;
  IF v_type IS NOT NULL AND v_type <> 'integer'::regtype THEN
    RAISE EXCEPTION 'shardlease: %.% exists with type %, not integer', p_table, quote_ident(p_column), v_type
      USING ERRCODE = 'datatype_mismatch';
  END IF;
  -- Nullable and without a default: a catalog change, no rewrite.
  IF v_type IS NULL THEN
    EXECUTE format('ALTER TABLE %s ADD COLUMN %I integer', p_table, p_column);
  END IF;
  SELECT ready_for_steady INTO v_backfilled FROM (
    SELECT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conrelid = p_table
                     AND c.conname = left(p_column || '_is_set', 63) AND c.convalidated)
        OR EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = p_table AND a.attname = p_column
                     AND a.attnotnull) AS ready_for_steady) s;
  -- New and changed rows get their hash from a trigger written for this table (a generic
  -- trigger reading the key by name through jsonb costs 10 times more per insert).
  v_function := left(format('set_%s_%s_%s', v_nsp, v_rel, p_column), 63);
  EXECUTE format(
    'CREATE OR REPLACE FUNCTION shardlease.%I() RETURNS trigger LANGUAGE plpgsql AS $f$ BEGIN NEW.%I := %s; RETURN NEW; END $f$',
    v_function, p_column, v_expr);
  EXECUTE format('COMMENT ON FUNCTION shardlease.%I() IS %L', v_function,
    format('Trigger of %s: sets %I to the stored hash of %I on every insert and on every update of %I (added by shardlease.add_key_hash).',
           p_table, p_column, p_key, p_key));
  -- Until every row has its hash, every new row version gets one (an update of a row the
  -- backfill has not reached must not violate the constraint below); once the constraint is
  -- validated, only inserts and updates that set the key or the hash need the trigger, and
  -- the members' updates run without it.
  IF v_backfilled THEN
    EXECUTE format(
      'CREATE OR REPLACE TRIGGER %I BEFORE INSERT OR UPDATE OF %I, %I ON %s FOR EACH ROW EXECUTE FUNCTION shardlease.%I()',
      left(p_column || '_set', 63), p_key, p_column, p_table, v_function);
  ELSE
    EXECUTE format(
      'CREATE OR REPLACE TRIGGER %I BEFORE INSERT OR UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION shardlease.%I()',
      left(p_column || '_set', 63), p_table, v_function);
  END IF;
  EXECUTE format('COMMENT ON TRIGGER %I ON %s IS %L', left(p_column || '_set', 63), p_table,
    format('Keeps %I equal to the stored hash of %I (shardlease.add_key_hash): on %s.', p_column, p_key,
           CASE WHEN v_backfilled THEN format('insert, and update of %I or %I', p_key, p_column)
                ELSE 'every insert and update, until the backfill is validated' END));
  -- The proof that every row has its hash, once validated (shardlease.key_hash_status):
  -- NOT VALID checks new rows only, so adding it scans nothing.
  IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = p_table AND conname = left(p_column || '_is_set', 63)) THEN
    EXECUTE format('ALTER TABLE %s ADD CONSTRAINT %I CHECK (%I IS NOT NULL) NOT VALID',
      p_table, left(p_column || '_is_set', 63), p_column);
  END IF;
  IF col_description(p_table, (SELECT attnum FROM pg_attribute WHERE attrelid = p_table AND attname = p_column)) IS NULL THEN
    EXECUTE format('COMMENT ON COLUMN %s.%I IS %L', p_table, p_column,
      format('Stored 32-bit hash of %I (shardlease: %s). Members own ranges of it.', p_key,
             split_part(v_expr, '(', 1)));
  END IF;
END
$$;
COMMENT ON FUNCTION shardlease.add_key_hash(regclass, name, name) IS
  'Step 1 (and last) of putting a live table on a stored hash, without a rewrite: add the nullable integer column p_column, the trigger p_column_set that fills it from key column p_key, and the constraint p_column_is_set CHECK (p_column IS NOT NULL) NOT VALID. Until that constraint is validated the trigger runs on every insert and update; called again afterwards, it narrows the trigger to inserts and updates of p_key or p_column. Idempotent. Takes brief locks that block writers: run with a bounded lock_timeout. Between the two calls: backfill_key_hash, CREATE INDEX CONCURRENTLY, backfill_key_hash_rest, VALIDATE CONSTRAINT (see key_hash_status).';

-- Step 2: fill the hash of the rows that predate the trigger, one bounded slice of pages per
-- call (a TID range scan: each call reads only its pages, however large the table).
CREATE FUNCTION shardlease.backfill_key_hash(p_table regclass, p_key name, p_column name,
                                             p_from_page bigint, p_pages integer)
RETURNS TABLE (updated bigint, next_page bigint, table_pages bigint)
LANGUAGE plpgsql AS $$
DECLARE
  v_expr text := shardlease.key_hash_expr(p_table, p_key, 't');
  v_pages bigint := pg_relation_size(p_table) / current_setting('block_size')::bigint;
  v_updated bigint;
BEGIN
  IF v_expr IS NULL THEN
    RAISE EXCEPTION 'shardlease: cannot hash column % of %', quote_ident(p_key), p_table
      USING ERRCODE = 'datatype_mismatch';
  END IF;
  IF p_from_page < 0 OR p_pages < 1 THEN
    RAISE EXCEPTION 'shardlease: backfill_key_hash needs p_from_page >= 0 and p_pages >= 1, not % and %', p_from_page, p_pages
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  -- Rows that a transaction holds locked (a member's tick) are skipped, never waited for:
  -- backfill_key_hash_rest picks them up later.
  EXECUTE format(
    'UPDATE %s AS t SET %I = %s WHERE t.ctid = ANY (ARRAY(SELECT s.ctid FROM %s AS s '
    'WHERE s.ctid >= %L::tid AND s.ctid < %L::tid AND s.%I IS NULL FOR NO KEY UPDATE SKIP LOCKED))',
    p_table, p_column, v_expr, p_table, format('(%s,0)', p_from_page), format('(%s,0)', p_from_page + p_pages), p_column);
  GET DIAGNOSTICS v_updated = ROW_COUNT;
  RETURN QUERY SELECT v_updated, p_from_page + p_pages, v_pages;
END
$$;
COMMENT ON FUNCTION shardlease.backfill_key_hash(regclass, name, name, bigint, integer) IS
  'Step 2 of putting a live table on a stored hash: set p_column from p_key where it is NULL, on pages p_from_page up to p_from_page + p_pages only (one short transaction per call), skipping rows other transactions hold locked. Returns the rows updated, the next page and the table''s size in pages; call again from next_page until it passes table_pages, then once more with backfill_key_hash_rest. shardlease::live_table does it all, with retries.';

-- The rows a slice-by-slice pass can miss: versions that a concurrent update moved to a page
-- already done, before their hash was set.
CREATE FUNCTION shardlease.backfill_key_hash_rest(p_table regclass, p_key name, p_column name, p_limit integer)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  v_expr text := shardlease.key_hash_expr(p_table, p_key, 't');
  v_updated bigint;
BEGIN
  IF p_limit < 1 THEN
    RAISE EXCEPTION 'shardlease: backfill_key_hash_rest needs p_limit >= 1, not %', p_limit
      USING ERRCODE = 'invalid_parameter_value';
  END IF;
  EXECUTE format(
    'UPDATE %s AS t SET %I = %s WHERE t.ctid = ANY (ARRAY(SELECT s.ctid FROM %s AS s WHERE s.%I IS NULL '
    'LIMIT %s FOR NO KEY UPDATE SKIP LOCKED))',
    p_table, p_column, v_expr, p_table, p_column, p_limit);
  GET DIAGNOSTICS v_updated = ROW_COUNT;
  RETURN v_updated;
END
$$;
COMMENT ON FUNCTION shardlease.backfill_key_hash_rest(regclass, name, name, integer) IS
  'Step 2, last pass: set p_column on at most p_limit rows where it is still NULL and no transaction holds locked (an index scan once the column is indexed). Call until it returns 0; VALIDATE CONSTRAINT p_column_is_set then proves no NULL is left.';

-- Where a table stands on the way.
CREATE FUNCTION shardlease.key_hash_status(p_table regclass, p_column name DEFAULT 'key_hash')
RETURNS TABLE (has_column boolean, has_trigger boolean, backfilled boolean, indexed boolean, ready boolean)
LANGUAGE sql STABLE AS $$
  WITH s AS (
    SELECT
      EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = p_table AND a.attname = p_column
                AND a.attnum > 0 AND NOT a.attisdropped AND a.atttypid = 'integer'::regtype) AS has_column,
      EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = p_table AND t.tgname = left(p_column || '_set', 63)
                AND t.tgenabled <> 'D') AS has_trigger,
      EXISTS (SELECT 1 FROM pg_trigger t WHERE t.tgrelid = p_table AND t.tgname = left(p_column || '_set', 63)
                AND t.tgenabled <> 'D' AND cardinality(t.tgattr::int2[]) > 0) AS narrow_trigger,
      EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conrelid = p_table AND c.conname = left(p_column || '_is_set', 63)
                AND c.convalidated)
        OR EXISTS (SELECT 1 FROM pg_attribute a WHERE a.attrelid = p_table AND a.attname = p_column AND a.attnotnull)
        AS backfilled,
      EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
               WHERE i.indrelid = p_table AND a.attname = p_column AND i.indisvalid AND i.indisready
                 AND i.indpred IS NULL AND i.indexprs IS NULL) AS indexed)
  SELECT has_column, has_trigger, backfilled, indexed,
         has_column AND has_trigger AND narrow_trigger AND backfilled AND indexed FROM s
$$;
COMMENT ON FUNCTION shardlease.key_hash_status(regclass, name) IS
  'How far a table is on its way to a stored hash: the integer column, the trigger (p_column_set), backfilled (constraint p_column_is_set validated, or the column NOT NULL), a valid index led by the column, and ready (all four, with the trigger narrowed to inserts and updates of the key by a last add_key_hash: members may own hash ranges of it).';

-- As V4 says of every new function: nobody but the owner calls the table-preparing ones.
-- The pure hashes stay public (users' triggers and queries compute them), and so does
-- key_hash_status, which only reads the catalogs (every worker checks it at start).
REVOKE EXECUTE ON FUNCTION
  shardlease.key_hash_expr(regclass, name, text),
  shardlease.add_key_hash(regclass, name, name),
  shardlease.backfill_key_hash(regclass, name, name, bigint, integer),
  shardlease.backfill_key_hash_rest(regclass, name, name, integer)
  FROM PUBLIC;
