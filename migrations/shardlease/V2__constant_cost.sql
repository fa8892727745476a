-- shardlease V2: constant cost per member, membership changes that cannot be starved.
--
-- * Liveness of every lease is read with ONE scan of pg_locks per check (V1 scanned it once
--   per lease), and only the group's checkers (its lowest slots) run that check. Every other
--   member's heartbeat probes the checkers' slot locks with try-locks, which touch one
--   lock-table entry each.
-- * Fenced transactions no longer lock the group row. They are checked at begin (no lock),
--   and again at commit under a transaction-level SHARED advisory lock (lock_key, -1);
--   membership changes take it EXCLUSIVE just before they bump the generation. The lock queue
--   is first come, first served, so a membership change waits only for fenced transactions
--   that are committing, never for a long one, and is never starved.
-- * Every change's NOTIFY carries the change itself (joined member, departed slots) and the
--   generation it applies to, so members keep their view current without a re-read per change.
-- * Heartbeats commit asynchronously: losing one in a server crash only makes a lease look
--   older, and the crash ends every session anyway.

-- The slot locks (lock_key, slot) held now, with their backends: one pg_locks scan.
CREATE FUNCTION shardlease.slot_locks(p_lock_key integer)
RETURNS TABLE (slot integer, pid integer) LANGUAGE sql STABLE AS $$
  SELECT k.objid::bigint::integer, k.pid
    FROM pg_locks k
   WHERE k.locktype = 'advisory' AND k.granted AND k.objsubid = 2 AND k.mode = 'ExclusiveLock'
     AND k.database = (SELECT oid FROM pg_database WHERE datname = current_database())
     AND k.classid = p_lock_key::oid
     AND k.objid < 1073741824::oid
$$;
COMMENT ON FUNCTION shardlease.slot_locks(integer) IS
  'The session advisory locks (p_lock_key, slot) granted now, with the backends holding them: one scan of pg_locks, whatever the group size.';

-- The group's leases whose member is dead: expired by the database clock, or whose session
-- backend no longer holds the slot lock. One pg_locks scan.
CREATE FUNCTION shardlease.dead_leases(p_group text)
RETURNS TABLE (incarnation bigint, slot integer, backend_pid integer, reason text)
LANGUAGE sql STABLE AS $$
  WITH held AS MATERIALIZED (
    SELECT k.slot, k.pid
      FROM shardlease.groups g, shardlease.slot_locks(g.lock_key) k
     WHERE g.name = p_group)
  SELECT l.incarnation, l.slot, l.backend_pid,
         CASE WHEN l.expires_at <= clock_timestamp() THEN 'expired' ELSE 'disconnected' END
    FROM shardlease.leases l
    LEFT JOIN held h ON h.slot = l.slot AND h.pid = l.backend_pid
   WHERE l.group_name = p_group
     AND (l.expires_at <= clock_timestamp() OR h.pid IS NULL)
$$;
COMMENT ON FUNCTION shardlease.dead_leases(text) IS
  'The group''s dead leases: expired by the database clock, or disconnected (the backend no longer holds the slot lock). One pg_locks scan.';

CREATE OR REPLACE FUNCTION shardlease.needs_reap(p_group text)
RETURNS boolean LANGUAGE sql STABLE AS $$
  SELECT EXISTS (SELECT 1 FROM shardlease.dead_leases(p_group))
$$;
COMMENT ON FUNCTION shardlease.needs_reap(text) IS
  'True when the group has a lease that is expired or whose member''s advisory lock is gone. Lock-free; one pg_locks scan. The group''s checkers poll it.';

-- Membership changes announce themselves with the change, so that a member whose view is at
-- generation "prev" can apply it without a re-read.
CREATE OR REPLACE FUNCTION shardlease.notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  v_kind text := coalesce(nullif(current_setting('shardlease.change_kind', true), ''), 'change');
  v_delta text := nullif(current_setting('shardlease.change_delta', true), '');
  v_payload text;
BEGIN
  v_payload := json_build_object(
    'group', NEW.name, 'generation', NEW.generation, 'kind', v_kind,
    'prev', OLD.generation, 'slot_count', NEW.slot_count, 'delta', v_delta::json)::text;
  IF octet_length(v_payload) > 7900 THEN
    -- Too large for a notification: send the hint only; members re-read.
    v_payload := json_build_object('group', NEW.name, 'generation', NEW.generation, 'kind', v_kind)::text;
  END IF;
  PERFORM pg_notify('shardlease', v_payload);
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION shardlease.notify_change() IS
  'Trigger: NOTIFY shardlease with {"group","generation","kind","prev","slot_count","delta"} whenever a group''s generation changes; delta (the joined member, or the departed slots and incarnations) is present when the change came from a shardlease function and fits in a notification.';

-- Bump the generation of a group whose row the caller holds FOR UPDATE, announcing p_delta.
CREATE FUNCTION shardlease.bump(p_group text, p_slot_count integer, p_kind text, p_delta jsonb)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  v_generation bigint;
  v_lock_key integer;
BEGIN
  SELECT g.lock_key INTO v_lock_key FROM shardlease.groups g WHERE g.name = p_group;
  -- Fenced transactions hold (lock_key, -1) shared while they commit: wait for those, and
  -- keep new ones out until this change has committed.
  PERFORM pg_advisory_xact_lock(v_lock_key, -1);
  PERFORM set_config('shardlease.change_kind', p_kind, true);
  PERFORM set_config('shardlease.change_delta', coalesce(p_delta::text, ''), true);
  UPDATE shardlease.groups
     SET generation = generation + 1, slot_count = p_slot_count, changed_at = clock_timestamp()
   WHERE name = p_group
  RETURNING generation INTO v_generation;
  PERFORM set_config('shardlease.change_delta', '', true);
  RETURN v_generation;
END
$$;
COMMENT ON FUNCTION shardlease.bump(text, integer, text, jsonb) IS
  'Internal: bump a group''s generation and set its slot count, announcing the change p_delta; waits for fenced transactions that are committing. The caller holds the group row FOR UPDATE.';

CREATE OR REPLACE FUNCTION shardlease.terminate_expired(p_group text)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
  v_count integer := 0;
  v_pid integer;
  v_wait_ms bigint;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM shardlease.leases l
                  WHERE l.group_name = p_group AND l.expires_at <= clock_timestamp()) THEN
    RETURN 0;
  END IF;
  -- Wait for a terminated backend to exit, but within half of this statement's own bound.
  SELECT least(2000, greatest(1, coalesce(nullif(s.setting, '0')::bigint / 2, 2000)))
    INTO v_wait_ms FROM pg_settings s WHERE s.name = 'statement_timeout';
  FOR v_pid IN
    SELECT DISTINCT k.pid
      FROM shardlease.leases l
      JOIN shardlease.groups g ON g.name = l.group_name
      JOIN pg_locks k ON k.locktype = 'advisory' AND k.granted AND k.objsubid = 2
                     AND k.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                     AND k.classid = g.lock_key::oid
                     AND ((k.objid = l.slot::oid AND k.pid = l.backend_pid)
                          OR k.objid = (1073741824 + l.slot)::oid)
     WHERE l.group_name = p_group AND l.expires_at <= clock_timestamp()
       AND k.pid <> pg_backend_pid()
  LOOP
    BEGIN
      IF pg_terminate_backend(v_pid, v_wait_ms) THEN
        v_count := v_count + 1;
      END IF;
    EXCEPTION WHEN OTHERS THEN
      RAISE WARNING 'shardlease: could not terminate backend % of an expired lease: %', v_pid, SQLERRM;
    END;
  END LOOP;
  RETURN v_count;
END
$$;

CREATE OR REPLACE FUNCTION shardlease.reap_locked(p_group text, p_lock_key integer, p_slot_count integer)
RETURNS TABLE (member_id text, slot integer, incarnation bigint, reason text, generation bigint)
LANGUAGE plpgsql AS $$
DECLARE
  v_members text[];
  v_slots integer[];
  v_incarnations bigint[];
  v_reasons text[];
  v_generation bigint;
BEGIN
  WITH dead AS MATERIALIZED (SELECT * FROM shardlease.dead_leases(p_group)),
  gone AS (
    DELETE FROM shardlease.leases l USING dead d
     WHERE l.group_name = p_group AND l.incarnation = d.incarnation
    RETURNING l.member_id, l.slot, l.incarnation, d.reason)
  SELECT array_agg(x.member_id ORDER BY x.slot), array_agg(x.slot ORDER BY x.slot),
         array_agg(x.incarnation ORDER BY x.slot), array_agg(x.reason ORDER BY x.slot)
    INTO v_members, v_slots, v_incarnations, v_reasons
    FROM gone x;
  IF v_slots IS NULL THEN
    RETURN;
  END IF;
  v_generation := shardlease.bump(p_group, shardlease.slot_count_after(p_slot_count, v_slots), 'reap',
                                  jsonb_build_object('gone', to_jsonb(v_incarnations)));
  RETURN QUERY
    SELECT u.m, u.s, u.i, u.r, v_generation
      FROM unnest(v_members, v_slots, v_incarnations, v_reasons) AS u(m, s, i, r);
END
$$;

CREATE OR REPLACE FUNCTION shardlease.reap(p_group text)
RETURNS TABLE (member_id text, slot integer, incarnation bigint, reason text, generation bigint)
LANGUAGE plpgsql AS $$
DECLARE
  g shardlease.groups;
BEGIN
  SELECT * INTO g FROM shardlease.groups WHERE name = p_group FOR UPDATE;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  -- End the expired members' proven backends before their leases go, under the group lock,
  -- so that no lease can expire between the two.
  PERFORM shardlease.terminate_expired(p_group);
  RETURN QUERY SELECT * FROM shardlease.reap_locked(p_group, g.lock_key, g.slot_count);
END
$$;

CREATE OR REPLACE FUNCTION shardlease.join(p_group text, p_member text, p_ttl interval,
                                           p_metadata jsonb, p_protocol integer)
RETURNS TABLE (slot integer, incarnation bigint, generation bigint, slot_count integer,
               lock_key integer, expires_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
  g shardlease.groups;
  v_slot integer;
  v_slot_count integer;
  v_incarnation bigint;
  v_generation bigint;
  v_expires timestamptz;
BEGIN
  INSERT INTO shardlease.groups (name, protocol_version) VALUES (p_group, p_protocol)
    ON CONFLICT (name) DO NOTHING;
  SELECT * INTO g FROM shardlease.groups WHERE name = p_group FOR UPDATE;
  PERFORM shardlease.terminate_expired(p_group);
  PERFORM shardlease.reap_locked(p_group, g.lock_key, g.slot_count);
  SELECT * INTO g FROM shardlease.groups WHERE name = p_group;

  IF g.protocol_version <> p_protocol THEN
    IF EXISTS (SELECT 1 FROM shardlease.leases l WHERE l.group_name = p_group) THEN
      RAISE EXCEPTION 'shardlease: group "%" runs assignment protocol %, this member speaks %',
        p_group, g.protocol_version, p_protocol USING ERRCODE = 'SLP01';
    END IF;
    UPDATE shardlease.groups SET protocol_version = p_protocol WHERE name = p_group;
  END IF;
  IF EXISTS (SELECT 1 FROM shardlease.leases l WHERE l.group_name = p_group AND l.member_id = p_member) THEN
    RAISE EXCEPTION 'shardlease: member id "%" already holds a live lease in group "%"', p_member, p_group
      USING ERRCODE = 'SLM01';
  END IF;

  SELECT min(s) INTO v_slot FROM generate_series(0, g.slot_count - 1) AS s
   WHERE NOT EXISTS (SELECT 1 FROM shardlease.leases l WHERE l.group_name = p_group AND l.slot = s);
  v_slot := coalesce(v_slot, g.slot_count);
  IF v_slot >= 65536 THEN
    RAISE EXCEPTION 'shardlease: group "%" is full: 65536 slots', p_group USING ERRCODE = 'SLF01';
  END IF;
  v_slot_count := greatest(g.slot_count, v_slot + 1);

  IF NOT pg_try_advisory_lock(g.lock_key, v_slot) THEN
    RAISE EXCEPTION 'shardlease: the advisory lock of vacant slot % of group "%" is still held by a departed member''s backend',
      v_slot, p_group USING ERRCODE = 'SLL01',
      HINT = 'The backend is ended when its lease expires; the join is retried.';
  END IF;

  v_incarnation := nextval('shardlease.incarnation_seq');
  v_expires := clock_timestamp() + p_ttl;
  INSERT INTO shardlease.leases (group_name, member_id, slot, incarnation, backend_pid, ttl, expires_at, metadata)
  VALUES (p_group, p_member, v_slot, v_incarnation, pg_backend_pid(), p_ttl, v_expires, coalesce(p_metadata, '{}'));
  v_generation := shardlease.bump(p_group, v_slot_count, 'join',
    jsonb_build_object('join', jsonb_build_object('member', p_member, 'slot', v_slot, 'incarnation', v_incarnation)));
  PERFORM set_config('application_name',
    left(format('shardlease#%s %s/%s', v_incarnation, p_group, p_member), 63), false);
  RETURN QUERY SELECT v_slot, v_incarnation, v_generation, v_slot_count, g.lock_key, v_expires;
END
$$;

CREATE OR REPLACE FUNCTION shardlease.leave(p_incarnation bigint)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  l shardlease.leases;
  g shardlease.groups;
BEGIN
  SELECT * INTO l FROM shardlease.leases WHERE incarnation = p_incarnation;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  SELECT * INTO g FROM shardlease.groups WHERE name = l.group_name FOR UPDATE;
  DELETE FROM shardlease.leases WHERE incarnation = p_incarnation;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  RETURN shardlease.bump(l.group_name, shardlease.slot_count_after(g.slot_count, ARRAY[l.slot]), 'leave',
                         jsonb_build_object('gone', jsonb_build_array(p_incarnation)));
END
$$;

DROP FUNCTION shardlease.bump(text, integer, text);

-- The heartbeat: renew the lease, and probe the checkers' slot locks.
CREATE FUNCTION shardlease.heartbeat(p_incarnation bigint, p_probe_slots integer[])
RETURNS TABLE (expires_at timestamptz, generation bigint, suspect boolean)
LANGUAGE plpgsql AS $$
DECLARE
  v_group text;
  v_own_slot integer;
  v_expires timestamptz;
  v_generation bigint;
  v_lock_key integer;
  v_slot integer;
  v_suspect boolean := false;
BEGIN
  -- A lost heartbeat costs nothing that matters (see the file header): skip the WAL flush.
  PERFORM set_config('synchronous_commit', 'off', true);
  UPDATE shardlease.leases l
     SET renewed_at = clock_timestamp(), expires_at = clock_timestamp() + l.ttl
   WHERE l.incarnation = p_incarnation AND l.expires_at > clock_timestamp()
     AND l.backend_pid = pg_backend_pid()
  RETURNING l.expires_at, l.group_name, l.slot INTO v_expires, v_group, v_own_slot;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  SELECT g.generation, g.lock_key INTO v_generation, v_lock_key
    FROM shardlease.groups g WHERE g.name = v_group;
  FOREACH v_slot IN ARRAY coalesce(p_probe_slots, '{}'::integer[]) LOOP
    CONTINUE WHEN v_slot = v_own_slot;
    -- A live member holds its slot lock exclusively, so a shared try-lock succeeds only when
    -- it is gone (released at the end of this transaction).
    IF pg_try_advisory_xact_lock_shared(v_lock_key, v_slot) THEN
      v_suspect := v_suspect OR EXISTS (
        SELECT 1 FROM shardlease.leases l WHERE l.group_name = v_group AND l.slot = v_slot);
    END IF;
  END LOOP;
  v_suspect := v_suspect OR EXISTS (
    SELECT 1 FROM shardlease.leases l
     WHERE l.group_name = v_group AND l.slot = ANY (p_probe_slots)
       AND l.expires_at <= clock_timestamp());
  RETURN QUERY SELECT v_expires, v_generation, v_suspect;
END
$$;
COMMENT ON FUNCTION shardlease.heartbeat(bigint, integer[]) IS
  'Heartbeat: extend a live lease by its ttl on the database clock (asynchronous commit), return the group''s generation, and probe the slot locks of p_probe_slots (the checkers): suspect is true when one of them is gone or expired. No row back means the lease is lost.';

-- Fenced transactions, step 1: the first statement. Checks without locking anything of the
-- group, so that a stale view fails fast.
CREATE FUNCTION shardlease.fence_begin(p_group text, p_incarnation bigint, p_generation bigint,
                                       p_idle_timeout_ms integer)
RETURNS TABLE (status text, current_generation bigint)
LANGUAGE plpgsql AS $$
DECLARE
  v_generation bigint;
  v_lock_key integer;
  l shardlease.leases;
BEGIN
  -- A member stopped in the middle of its transaction must not hold row locks for long.
  PERFORM set_config('idle_in_transaction_session_timeout', p_idle_timeout_ms || 'ms', true);
  SELECT g.generation, g.lock_key INTO v_generation, v_lock_key
    FROM shardlease.groups g WHERE g.name = p_group;
  IF NOT FOUND THEN
    RETURN QUERY SELECT 'no_group'::text, NULL::bigint;
    RETURN;
  END IF;
  IF v_generation <> p_generation THEN
    RETURN QUERY SELECT 'stale_generation'::text, v_generation;
    RETURN;
  END IF;
  SELECT * INTO l FROM shardlease.leases
   WHERE group_name = p_group AND incarnation = p_incarnation;
  IF NOT FOUND THEN
    RETURN QUERY SELECT 'lease_gone'::text, v_generation;
    RETURN;
  END IF;
  IF l.expires_at <= clock_timestamp() THEN
    RETURN QUERY SELECT 'lease_expired'::text, v_generation;
    RETURN;
  END IF;
  -- Mark this transaction as the member's (terminate_expired ends it with the member).
  PERFORM pg_advisory_xact_lock_shared(v_lock_key, 1073741824 + l.slot);
  RETURN QUERY SELECT 'ok'::text, v_generation;
END
$$;
COMMENT ON FUNCTION shardlease.fence_begin(text, bigint, bigint, integer) IS
  'Fenced transaction, first statement: bound its idle time, check (without locking) that the generation is still p_generation and the lease live, and mark the transaction as the member''s. Status ok, stale_generation, lease_gone, lease_expired or no_group.';

-- Fenced transactions, step 2: sent with COMMIT in one message, so that the shared lock is
-- held only while the server commits. Raises SLX01 when the fence no longer holds.
CREATE FUNCTION shardlease.fence_commit(p_incarnation bigint, p_generation bigint,
                                        p_lock_timeout_ms integer)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  v_group text;
  v_lock_key integer;
  v_generation bigint;
  v_expires timestamptz;
  v_status text;
BEGIN
  PERFORM set_config('lock_timeout', p_lock_timeout_ms || 'ms', true);
  SELECT l.group_name INTO v_group FROM shardlease.leases l WHERE l.incarnation = p_incarnation;
  IF FOUND THEN
    IF current_setting('transaction_isolation') = 'read committed' THEN
      SELECT g.lock_key INTO v_lock_key FROM shardlease.groups g WHERE g.name = v_group;
      PERFORM pg_advisory_xact_lock_shared(v_lock_key, -1);
      -- A new snapshot, taken after the lock: no change can commit until this transaction has.
      SELECT g.generation INTO v_generation FROM shardlease.groups g WHERE g.name = v_group;
    ELSE
      -- A transaction snapshot is older than the lock would be: lock the row instead, which
      -- fails with a serialization error if a change committed since the snapshot.
      SELECT g.generation INTO v_generation FROM shardlease.groups g WHERE g.name = v_group FOR SHARE;
    END IF;
    SELECT l.expires_at INTO v_expires FROM shardlease.leases l WHERE l.incarnation = p_incarnation;
  END IF;
  v_status := CASE
    WHEN v_group IS NULL OR v_expires IS NULL THEN 'lease_gone'
    WHEN v_generation <> p_generation THEN 'stale_generation'
    WHEN v_expires <= clock_timestamp() THEN 'lease_expired'
  END;
  IF v_status IS NOT NULL THEN
    RAISE EXCEPTION 'shardlease fence: %', v_status USING ERRCODE = 'SLX01',
      DETAIL = format('current generation %s, fence generation %s', coalesce(v_generation::text, 'unknown'), p_generation),
      HINT = 'The membership changed since the view this transaction was computed from: refresh the view and retry.';
  END IF;
END
$$;
COMMENT ON FUNCTION shardlease.fence_commit(bigint, bigint, integer) IS
  'Fenced transaction, last statement, sent together with COMMIT: under the group''s shared fence lock (lock_key, -1), check that the generation is still p_generation and the lease live; else raise SLX01 (the message names the reason), so that the COMMIT never runs.';

-- psql views: one pg_locks scan per query, whatever the group size.
CREATE OR REPLACE VIEW shardlease.members AS
WITH held AS MATERIALIZED (
  SELECT g.name AS group_name, k.slot, k.pid
    FROM shardlease.groups g, shardlease.slot_locks(g.lock_key) k)
SELECT l.group_name,
       l.member_id,
       l.slot,
       l.incarnation,
       (l.expires_at > clock_timestamp() AND h.pid IS NOT NULL) AS alive,
       (h.pid IS NOT NULL) AS connected,
       date_trunc('milliseconds', l.expires_at - clock_timestamp()) AS expires_in,
       l.joined_at,
       l.renewed_at,
       l.expires_at,
       l.backend_pid,
       g.generation,
       g.slot_count,
       l.metadata
  FROM shardlease.leases l
  JOIN shardlease.groups g ON g.name = l.group_name
  LEFT JOIN held h ON h.group_name = l.group_name AND h.slot = l.slot AND h.pid = l.backend_pid;
