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

-- The group's leases whose member is dead: expired by the database clock, or whose slot lock
-- is free. Each lease is probed with a shared try-lock on its slot lock (lock_key, slot),
-- which only a live member holds, exclusively: one lock-table entry per lease, so the cost
-- grows with the group and nothing else. (A pg_locks scan takes all 16 lock-manager
-- partition locks, stalling every lock request on the server meanwhile, and walks a table
-- sized by max_connections: about 2 ms at max_connections 2300, even for a group of ten.
-- The backend status array, pg_stat_get_activity, took 11 ms with 1,000 backends.) A granted
-- probe is held until the end of the caller's transaction; the caller's own lease is not
-- probed (its backend holds the lock, and a backend never conflicts with itself).
CREATE FUNCTION shardlease.dead_leases(p_group text)
RETURNS TABLE (incarnation bigint, slot integer, backend_pid integer, reason text)
LANGUAGE plpgsql AS $$
BEGIN
  -- plpgsql, not sql: its plan is cached, where a non-inlined sql function is planned per call.
  RETURN QUERY
    WITH leases AS MATERIALIZED (
      SELECT l.incarnation, l.slot, l.backend_pid, l.expires_at <= clock_timestamp() AS expired, g.lock_key
        FROM shardlease.leases l JOIN shardlease.groups g ON g.name = l.group_name
       WHERE l.group_name = p_group)
    SELECT x.incarnation, x.slot, x.backend_pid,
           CASE WHEN x.expired THEN 'expired' ELSE 'disconnected' END
      FROM leases x
     WHERE x.expired
        OR (x.backend_pid <> pg_backend_pid()
            AND pg_try_advisory_xact_lock_shared(x.lock_key, x.slot));
END
$$;
COMMENT ON FUNCTION shardlease.dead_leases(text) IS
  'The group''s dead leases: expired by the database clock, or disconnected (nobody holds the slot lock: probed with a shared try-lock per lease, held to the end of the caller''s transaction). No pg_locks scan.';

CREATE OR REPLACE FUNCTION shardlease.needs_reap(p_group text)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  RETURN EXISTS (SELECT 1 FROM shardlease.dead_leases(p_group));
END
$$;
COMMENT ON FUNCTION shardlease.needs_reap(text) IS
  'True when the group has a lease that is expired or whose member''s advisory lock is free (one shared try-lock per lease). The group''s checkers poll it.';

-- Announcements. Every change made by a shardlease function is queued on its group row
-- (unannounced) and announced with NOTIFY, carrying the changes since the last announcement
-- and the generation they apply to (prev), so that members keep their view current without
-- a re-read. Departures are announced at once. Joins are announced at most once per
-- announce_gap: a burst of N joins must not wake every member N times (at 1,000 members a
-- cold start would cost half a million wake-ups); the group's checkers flush what is left.
-- The gap grows with the group (see announce_gap).
ALTER TABLE shardlease.groups
  ADD COLUMN announced_generation bigint NOT NULL DEFAULT 0,
  ADD COLUMN announced_at timestamptz NOT NULL DEFAULT '-infinity',
  ADD COLUMN unannounced jsonb NOT NULL DEFAULT '[]'::jsonb;
UPDATE shardlease.groups SET announced_generation = generation;
COMMENT ON COLUMN shardlease.groups.announced_generation IS
  'The generation the last NOTIFY announced; changes after it are queued in unannounced.';
COMMENT ON COLUMN shardlease.groups.announced_at IS 'When the last NOTIFY was sent (database clock).';
COMMENT ON COLUMN shardlease.groups.unannounced IS
  'Changes since announced_generation, one per generation, oldest first, not yet announced: {"join":{...},"s":S} or {"gone":[...],"s":S} (S: the slot count after it), or null for a change that carries no detail.';

-- The least interval between two join announcements of a group of p_slot_count slots. An
-- announcement wakes every member, so its cost grows with the group: 0.1 ms per slot, at
-- most 100 ms, keeps join announcements under about 10,000 wake-ups per second at any size.
CREATE FUNCTION shardlease.announce_gap(p_slot_count integer) RETURNS interval
LANGUAGE sql IMMUTABLE AS $$
  SELECT least(interval '100 milliseconds', p_slot_count * interval '100 microseconds')
$$;
COMMENT ON FUNCTION shardlease.announce_gap(integer) IS
  'The least interval between two announcements of joins in a group of p_slot_count slots (0.1 ms per slot, at most 100 ms): joins in between are announced together.';

-- NOTIFY the group's unannounced changes and mark them announced. The caller holds the
-- group row locked (FOR UPDATE).
CREATE FUNCTION shardlease.announce(p_group text, p_kind text) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  g shardlease.groups;
  v_prev bigint;
  v_chunk jsonb := '[]'::jsonb;
  v_size integer := 0;
  v_delta jsonb;
  v_delta_size integer;
BEGIN
  SELECT * INTO g FROM shardlease.groups WHERE name = p_group;
  v_prev := g.announced_generation;
  IF g.generation - g.announced_generation <> jsonb_array_length(g.unannounced)
     OR jsonb_path_exists(g.unannounced, '$[*] ? (@ == null)') THEN
    -- A change without detail: a hint only; members re-read.
    PERFORM shardlease.notify_hint(g.name, g.generation, p_kind);
  ELSE
    -- One delta per generation. A notification holds at most 8000 bytes: send as many as
    -- it takes, in order, each with the generations it spans.
    FOR v_delta IN SELECT d FROM jsonb_array_elements(g.unannounced) AS d LOOP
      v_delta_size := octet_length(v_delta::text);
      IF v_size + v_delta_size > 7000 AND v_size > 0 THEN
        PERFORM shardlease.notify_deltas(g.name, v_prev, v_chunk, p_kind);
        v_prev := v_prev + jsonb_array_length(v_chunk);
        v_chunk := '[]'::jsonb;
        v_size := 0;
      END IF;
      IF v_delta_size > 7000 THEN
        -- One change too large to announce (a mass reap): a hint for the rest.
        PERFORM shardlease.notify_hint(g.name, g.generation, p_kind);
        v_chunk := '[]'::jsonb;
        EXIT;
      END IF;
      v_chunk := v_chunk || jsonb_build_array(v_delta);
      v_size := v_size + v_delta_size;
    END LOOP;
    IF jsonb_array_length(v_chunk) > 0 THEN
      PERFORM shardlease.notify_deltas(g.name, v_prev, v_chunk, p_kind);
    END IF;
  END IF;
  UPDATE shardlease.groups
     SET announced_generation = generation, announced_at = clock_timestamp(), unannounced = '[]'
   WHERE name = p_group;
END
$$;
COMMENT ON FUNCTION shardlease.announce(text, text) IS
  'Internal: NOTIFY shardlease with the group''s changes since the last announcement, as {"group","generation","kind","prev","slot_count","deltas"} (one delta per generation from prev; several notifications when they do not fit in one), or a hint {"group","generation","kind"} when a change carries no detail; then mark them announced. The caller holds the group row FOR UPDATE.';

CREATE FUNCTION shardlease.notify_deltas(p_group text, p_prev bigint, p_deltas jsonb, p_kind text)
RETURNS void LANGUAGE sql AS $$
  SELECT pg_notify('shardlease', json_build_object(
    'group', p_group, 'generation', p_prev + jsonb_array_length(p_deltas), 'kind', p_kind,
    'prev', p_prev, 'slot_count', (p_deltas -> -1 ->> 's')::integer, 'deltas', p_deltas)::text)
$$;
COMMENT ON FUNCTION shardlease.notify_deltas(text, bigint, jsonb, text) IS
  'Internal: NOTIFY the changes p_deltas, which take the group from generation p_prev on; slot_count is the last change''s.';

CREATE FUNCTION shardlease.notify_hint(p_group text, p_generation bigint, p_kind text)
RETURNS void LANGUAGE sql AS $$
  SELECT pg_notify('shardlease', json_build_object(
    'group', p_group, 'generation', p_generation, 'kind', p_kind)::text)
$$;
COMMENT ON FUNCTION shardlease.notify_hint(text, bigint, text) IS
  'Internal: NOTIFY that the group changed, without the change: members re-read.';

COMMENT ON FUNCTION shardlease.announce(text, text) IS
  'Internal: NOTIFY shardlease with {"group","generation","kind","prev","slot_count","deltas"}: the changes since generation prev (deltas is null when one of them carries no detail), and mark them announced. The caller holds the group row FOR UPDATE.';

-- Announce a group's queued changes once announce_gap has passed since the last
-- announcement. Called by the group's checkers; skips (and returns false) while a
-- membership change holds the row: that change announces.
CREATE FUNCTION shardlease.flush_announcements(p_group text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
  PERFORM 1 FROM shardlease.groups g
   WHERE g.name = p_group AND g.announced_generation <> g.generation
     AND g.announced_at <= clock_timestamp() - shardlease.announce_gap(g.slot_count)
     FOR UPDATE SKIP LOCKED;
  IF NOT FOUND THEN
    RETURN false;
  END IF;
  PERFORM shardlease.announce(p_group, 'join');
  RETURN true;
END
$$;
COMMENT ON FUNCTION shardlease.flush_announcements(text) IS
  'Announce the group''s queued changes if the last announcement is at least announce_gap old; the group''s checkers call it. True when it announced.';

-- Hand edits of the generation are announced as a hint (members re-read); the library's
-- own changes announce themselves.
CREATE OR REPLACE FUNCTION shardlease.notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF coalesce(current_setting('shardlease.in_change', true), '') = 'on' THEN
    RETURN NULL;
  END IF;
  PERFORM pg_notify('shardlease', json_build_object(
    'group', NEW.name, 'generation', NEW.generation, 'kind', 'change')::text);
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION shardlease.notify_change() IS
  'Trigger: NOTIFY shardlease with {"group","generation","kind":"change"} when a group''s generation is changed by hand; the library''s own changes are announced by shardlease.announce.';

-- Bump the generation of a group whose row the caller holds FOR UPDATE, and queue p_delta
-- for announcement: at once for a departure, within announce_gap for a join.
CREATE FUNCTION shardlease.bump(p_group text, p_slot_count integer, p_kind text, p_delta jsonb)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  v_generation bigint;
  v_lock_key integer;
  v_announced_at timestamptz;
BEGIN
  SELECT g.lock_key INTO v_lock_key FROM shardlease.groups g WHERE g.name = p_group;
  -- Fenced transactions hold (lock_key, -1) shared while they commit: wait for those, and
  -- keep new ones out until this change has committed.
  PERFORM pg_advisory_xact_lock(v_lock_key, -1);
  PERFORM set_config('shardlease.in_change', 'on', true);
  UPDATE shardlease.groups
     SET generation = generation + 1, slot_count = p_slot_count, changed_at = clock_timestamp(),
         unannounced = unannounced || jsonb_build_array(p_delta || jsonb_build_object('s', p_slot_count))
   WHERE name = p_group
  RETURNING generation, announced_at INTO v_generation, v_announced_at;
  PERFORM set_config('shardlease.in_change', '', true);
  -- The gap of the group at its new size (see announce_gap).
  IF p_kind <> 'join' OR v_announced_at <= clock_timestamp() - shardlease.announce_gap(p_slot_count) THEN
    PERFORM shardlease.announce(p_group, p_kind);
  END IF;
  RETURN v_generation;
END
$$;
COMMENT ON FUNCTION shardlease.bump(text, integer, text, jsonb) IS
  'Internal: bump a group''s generation and set its slot count, queue the change p_delta and announce (departures at once, joins at most once per announce_gap); waits for fenced transactions that are committing. The caller holds the group row FOR UPDATE.';

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

-- Delete the given leases of a group whose row the caller holds FOR UPDATE, shrink S and
-- bump the generation once. Returns the deleted leases.
CREATE FUNCTION shardlease.delete_leases(p_group text, p_slot_count integer,
                                         p_incarnations bigint[], p_reasons text[])
RETURNS TABLE (member_id text, slot integer, incarnation bigint, reason text, generation bigint)
LANGUAGE plpgsql AS $$
DECLARE
  v_members text[];
  v_slots integer[];
  v_incarnations bigint[];
  v_reasons text[];
  v_generation bigint;
BEGIN
  WITH gone AS (
    DELETE FROM shardlease.leases l
     USING unnest(p_incarnations, p_reasons) AS d(incarnation, reason)
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
COMMENT ON FUNCTION shardlease.delete_leases(text, integer, bigint[], text[]) IS
  'Internal: delete the given leases (by incarnation, with the reason to report), shrink S and bump the generation once; the caller holds the group row FOR UPDATE.';

CREATE OR REPLACE FUNCTION shardlease.reap_locked(p_group text, p_lock_key integer, p_slot_count integer)
RETURNS TABLE (member_id text, slot integer, incarnation bigint, reason text, generation bigint)
LANGUAGE plpgsql AS $$
DECLARE
  v_incarnations bigint[];
  v_reasons text[];
BEGIN
  SELECT array_agg(d.incarnation), array_agg(d.reason) INTO v_incarnations, v_reasons
    FROM shardlease.dead_leases(p_group) d;
  IF v_incarnations IS NULL THEN
    RETURN;
  END IF;
  RETURN QUERY SELECT * FROM shardlease.delete_leases(p_group, p_slot_count, v_incarnations, v_reasons);
END
$$;

-- What a joiner reaps, in O(log N): the checkers' leases (the lowest slots) and its own
-- member id's earlier lease, when they are expired or their slot lock is free. Finding other
-- crashed or expired members is the checkers' work; a joiner only makes sure that there are
-- live checkers to do it.
CREATE FUNCTION shardlease.joiner_reapable(p_group text, p_member text)
RETURNS TABLE (incarnation bigint, reason text)
LANGUAGE plpgsql AS $$
BEGIN
  RETURN QUERY
    WITH candidates AS MATERIALIZED (
      (SELECT l.incarnation, l.slot, l.backend_pid, l.expires_at <= clock_timestamp() AS expired
         FROM shardlease.leases l
        WHERE l.group_name = p_group ORDER BY l.slot LIMIT 3)
      UNION
      (SELECT l.incarnation, l.slot, l.backend_pid, l.expires_at <= clock_timestamp()
         FROM shardlease.leases l
        WHERE l.group_name = p_group AND l.member_id = p_member))
    SELECT c.incarnation, CASE WHEN c.expired THEN 'expired' ELSE 'disconnected' END
      FROM candidates c JOIN shardlease.groups g ON g.name = p_group
     -- a try-lock is free only when its member is gone; released when this transaction ends
     -- (not our own backend's lease: a backend never conflicts with itself)
     WHERE c.expired
        OR (c.backend_pid <> pg_backend_pid() AND pg_try_advisory_xact_lock_shared(g.lock_key, c.slot));
END
$$;
COMMENT ON FUNCTION shardlease.joiner_reapable(text, text) IS
  'Internal: the leases a joiner reaps: the checkers'' (three lowest slots) and its own member id''s, when expired or when their slot lock is free. Index lookups only.';

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
  v_reap bigint[];
  v_reasons text[];
BEGIN
  INSERT INTO shardlease.groups (name, protocol_version) VALUES (p_group, p_protocol)
    ON CONFLICT (name) DO NOTHING;
  SELECT * INTO g FROM shardlease.groups WHERE name = p_group FOR UPDATE;
  SELECT array_agg(r.incarnation), array_agg(r.reason) INTO v_reap, v_reasons
    FROM shardlease.joiner_reapable(p_group, p_member) r;
  IF v_reap IS NOT NULL THEN
    -- End expired members' proven backends before their leases go.
    IF 'expired' = ANY (v_reasons) THEN
      PERFORM shardlease.terminate_expired(p_group);
    END IF;
    PERFORM shardlease.delete_leases(p_group, g.slot_count, v_reap, v_reasons);
    SELECT * INTO g FROM shardlease.groups WHERE name = p_group;
  END IF;

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

  IF EXISTS (SELECT 1 FROM shardlease.leases l WHERE l.group_name = p_group AND l.slot >= g.slot_count) THEN
    RAISE EXCEPTION 'shardlease: group "%" has a lease in slot % or above, but its slot count is %',
      p_group, g.slot_count, g.slot_count USING ERRCODE = 'SLI01',
      HINT = 'A hand edit? Set shardlease.groups.slot_count above every lease''s slot, or delete the stray lease.';
  END IF;
  -- The lowest vacant slot: the first slot that differs from its rank, in one ordered index
  -- scan (slots are unique); with no gap, the next after the last; S when all are taken.
  SELECT min(x.rank) INTO v_slot
    FROM (SELECT l.slot, row_number() OVER (ORDER BY l.slot) - 1 AS rank
            FROM shardlease.leases l WHERE l.group_name = p_group) x
   WHERE x.slot <> x.rank;
  IF v_slot IS NULL THEN
    SELECT count(*) INTO v_slot FROM shardlease.leases l WHERE l.group_name = p_group;
  END IF;
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

-- The heartbeat: renew the lease when it runs low, and probe the checkers' slot locks.
-- The generation it returns is the last one announced, unless announcements have stalled:
-- a member whose view is older re-reads.
-- Mostly read-only: a heartbeat writes (and commits asynchronously) only when less than
-- p_renew_below is left on the lease, so that a member costs about one cheap read per beat.
CREATE FUNCTION shardlease.heartbeat(p_incarnation bigint, p_probe_slots integer[],
                                     p_renew_below interval)
RETURNS TABLE (expires_at timestamptz, generation bigint, suspect boolean)
LANGUAGE plpgsql AS $$
DECLARE
  l record;
  v_suspect boolean := false;
BEGIN
  SELECT le.group_name, le.slot, le.expires_at, le.ttl, g.lock_key,
         -- Changes not yet announced will be, within announce_gap: until then members need
         -- not re-read for them (a burst of joins must not make a thousand members re-read
         -- the group at every beat). Unless announcements have stalled: then the truth.
         CASE WHEN g.announced_at > clock_timestamp() - interval '1 second'
              THEN g.announced_generation ELSE g.generation END AS generation
    INTO l
    FROM shardlease.leases le JOIN shardlease.groups g ON g.name = le.group_name
   WHERE le.incarnation = p_incarnation AND le.backend_pid = pg_backend_pid()
     AND le.expires_at > clock_timestamp();
  IF NOT FOUND THEN
    RETURN;
  END IF;
  IF l.expires_at - clock_timestamp() < p_renew_below THEN
    -- Losing a renewal in a server crash costs nothing: the crash ends every session anyway.
    PERFORM set_config('synchronous_commit', 'off', true);
    UPDATE shardlease.leases le
       SET renewed_at = clock_timestamp(), expires_at = clock_timestamp() + le.ttl
     WHERE le.incarnation = p_incarnation
    RETURNING le.expires_at INTO l.expires_at;
  END IF;
  IF cardinality(p_probe_slots) > 0 THEN
    -- A live member holds its slot lock exclusively, so a shared try-lock succeeds only when
    -- it is gone (and is released at the end of this transaction).
    SELECT EXISTS (
      SELECT 1 FROM shardlease.leases le
       WHERE le.group_name = l.group_name AND le.slot = ANY (p_probe_slots) AND le.slot <> l.slot
         AND (le.expires_at <= clock_timestamp()
              OR pg_try_advisory_xact_lock_shared(l.lock_key, le.slot))) INTO v_suspect;
  END IF;
  RETURN QUERY SELECT l.expires_at, l.generation, v_suspect;
END
$$;
COMMENT ON FUNCTION shardlease.heartbeat(bigint, integer[], interval) IS
  'Heartbeat: when less than p_renew_below is left, extend a live lease by its ttl on the database clock (asynchronous commit); return the group''s generation, and the group''s generation as last announced (the current one if announcements have stalled for a second): a view older than that is re-read. Probes the slot locks of p_probe_slots (the checkers): suspect is true when one of them is gone or expired. No row back means the lease is lost.';

-- Fenced transactions, step 1: the first statement. Checks without locking anything of the
-- group, so that a stale view fails fast.
CREATE FUNCTION shardlease.fence_begin(p_group text, p_incarnation bigint, p_generation bigint)
RETURNS TABLE (status text, current_generation bigint)
LANGUAGE plpgsql AS $$
DECLARE
  v_generation bigint;
  v_lock_key integer;
  l shardlease.leases;
BEGIN
  -- No time limit: nothing of the group waits for this transaction, and the commit check
  -- refuses it if the membership changed. A member stopped in the middle of it is ended by
  -- the reaper when its lease expires (terminate_expired: the mark below proves it).
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
COMMENT ON FUNCTION shardlease.fence_begin(text, bigint, bigint) IS
  'Fenced transaction, first statement: check (without locking) that the generation is still p_generation and the lease live, and mark the transaction as the member''s. Status ok, stale_generation, lease_gone, lease_expired or no_group.';

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

-- What V1 members (older builds, during a rolling upgrade) still call. They stay safe beside
-- V2 members: every membership change now goes through the V2 functions above (the same
-- names), whose FOR UPDATE on the group row conflicts with the V1 fence's FOR SHARE.
COMMENT ON FUNCTION shardlease.fence(text, bigint, bigint, integer) IS
  'V1 fence, for members of builds before schema V2 during a rolling upgrade: locks the group row FOR SHARE for the whole transaction. Current members use fence_begin and fence_commit, which never hold a membership change back.';
COMMENT ON FUNCTION shardlease.renew(bigint) IS
  'V1 heartbeat, for members of builds before schema V2 during a rolling upgrade: extends the lease on every call. Current members call shardlease.heartbeat.';
COMMENT ON FUNCTION shardlease.lock_held(integer, integer, integer) IS
  'True when backend p_pid holds the session advisory lock (p_lock_key, p_slot). Scans pg_locks on every call: for many leases use shardlease.slot_locks (one scan).';
COMMENT ON FUNCTION shardlease.join(text, text, interval, jsonb, integer) IS
  'Join a group in one transaction: lock the group row, reap the checkers (three lowest slots) and this member id''s earlier lease if they are dead, take the lowest vacant slot (or slot S, S grows), take the session advisory lock, insert the lease, bump the generation and queue the announcement. Call it on the member''s dedicated session connection.';
COMMENT ON FUNCTION shardlease.reap(text) IS
  'Reap the group''s dead members (expired leases, or members whose slot lock is free) in one transaction: lock the group row, end the expired members'' proven backends, delete their leases, shrink S, bump the generation, announce. Returns the reaped leases.';
