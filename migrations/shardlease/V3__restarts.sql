-- shardlease V3: survive database restarts, failovers and zombies with minimal movement.
--
-- * Sticky slots. A lease that is reaped (its member crashed, hung or lost its connection,
--   or the whole server restarted) leaves a reservation of its slot for its member id, for
--   twice the lease's TTL. Meanwhile no other member takes that slot, and the member that
--   comes back under the same id gets it again: a restart of the database moves nothing
--   whose owner returns in time. A graceful leave reserves nothing.
-- * Terminate before delete. An expired lease is deleted only once its slot lock is free:
--   after its member's backend has been ended, in the same transaction, under the group
--   lock. A backend that cannot be ended keeps its lease (reported by reap, and retried
--   once per TTL), since deleting the lease would leave the zombie holding the slot's lock.
-- * A fencing epoch. Every incarnation carries the timeline of the server it joined on.
--   A failover or a point-in-time restore starts a new timeline and may roll back the
--   generation and the incarnation sequence; a lease, a heartbeat or a fence from another
--   timeline never matches again.

-- The epoch -------------------------------------------------------------------------------

-- The timeline WAL is written on now; NULL on a standby (nothing can be fenced there).
CREATE FUNCTION shardlease.timeline() RETURNS bigint LANGUAGE sql VOLATILE AS $$
  SELECT CASE WHEN pg_is_in_recovery() THEN NULL
              ELSE ('x' || left(pg_walfile_name(pg_current_wal_lsn()), 8))::bit(32)::bigint END
$$;
COMMENT ON FUNCTION shardlease.timeline() IS
  'The server''s current timeline (from the WAL file name), NULL during recovery. A failover or a point-in-time restore starts a new one.';

-- Incarnations are (timeline << 40) | (sequence value mod 2^40).
CREATE FUNCTION shardlease.incarnation_timeline(p_incarnation bigint) RETURNS bigint
LANGUAGE sql IMMUTABLE AS $$ SELECT p_incarnation >> 40 $$;
COMMENT ON FUNCTION shardlease.incarnation_timeline(bigint) IS
  'The timeline an incarnation was issued on: its bits from 40 up. Leases of schemas before V3 carry 0, and are renewed no more (their members rejoin once).';

COMMENT ON SEQUENCE shardlease.incarnation_seq IS
  'Source of lease incarnations: a join takes (timeline << 40) | (nextval mod 2^40), never reused on one timeline, and never equal across timelines.';

-- Sticky slots ----------------------------------------------------------------------------

CREATE TABLE shardlease.slot_reservations (
  group_name     text        NOT NULL REFERENCES shardlease.groups (name),
  slot           integer     NOT NULL CHECK (slot >= 0 AND slot < 65536),
  member_id      text        NOT NULL,
  reserved_until timestamptz NOT NULL,
  reaped_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
  PRIMARY KEY (group_name, slot),
  UNIQUE (group_name, member_id)
);
COMMENT ON TABLE shardlease.slot_reservations IS
  'Slots of reaped members, kept for them for twice their lease TTL: no other member joins into a reserved slot, and the member that rejoins under the same id gets it back. A graceful leave reserves nothing.';
COMMENT ON COLUMN shardlease.slot_reservations.group_name IS 'The group.';
COMMENT ON COLUMN shardlease.slot_reservations.slot IS 'The reserved slot.';
COMMENT ON COLUMN shardlease.slot_reservations.member_id IS 'The member the slot is kept for.';
COMMENT ON COLUMN shardlease.slot_reservations.reserved_until IS
  'The reservation lapses at this instant of the database clock (reaped_at + 2 x the lease TTL).';
COMMENT ON COLUMN shardlease.slot_reservations.reaped_at IS 'When the member''s lease was reaped (database clock).';

ALTER TABLE shardlease.leases ADD COLUMN unkillable_since timestamptz;
COMMENT ON COLUMN shardlease.leases.unkillable_since IS
  'Set when the expired member''s backend could not be ended (no privilege, or it did not exit in time): the lease is kept, and termination is tried again one TTL later.';

-- Terminate before delete -----------------------------------------------------------------

-- End the backends of expired leases, and only backends proven to be theirs: the session
-- backend that holds the lease's slot lock, and backends inside a fenced transaction of that
-- slot (they hold the shared transaction lock (lock_key, 2^30 + slot)). Waits for each to
-- exit. A lease whose backend could not be ended is marked unkillable_since, and reported.
CREATE OR REPLACE FUNCTION shardlease.terminate_expired(p_group text)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
  v_count integer := 0;
  v_wait_ms bigint;
  v_ended boolean;
  v_error text;
  r record;
BEGIN
  IF NOT EXISTS (SELECT 1 FROM shardlease.leases l
                  WHERE l.group_name = p_group AND l.expires_at <= clock_timestamp()
                    AND (l.unkillable_since IS NULL OR l.unkillable_since <= clock_timestamp() - l.ttl)) THEN
    RETURN 0;
  END IF;
  -- Wait for a terminated backend to exit, but within half of this statement's own bound.
  SELECT least(2000, greatest(1, coalesce(nullif(s.setting, '0')::bigint / 2, 2000)))
    INTO v_wait_ms FROM pg_settings s WHERE s.name = 'statement_timeout';
  FOR r IN
    SELECT DISTINCT l.incarnation, l.member_id, l.slot, k.pid
      FROM shardlease.leases l
      JOIN shardlease.groups g ON g.name = l.group_name
      JOIN pg_locks k ON k.locktype = 'advisory' AND k.granted AND k.objsubid = 2
                     AND k.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                     AND k.classid = g.lock_key::oid
                     AND ((k.objid = l.slot::oid AND k.pid = l.backend_pid)
                          OR k.objid = (1073741824 + l.slot)::oid)
     WHERE l.group_name = p_group AND l.expires_at <= clock_timestamp()
       AND (l.unkillable_since IS NULL OR l.unkillable_since <= clock_timestamp() - l.ttl)
       AND k.pid <> pg_backend_pid()
  LOOP
    v_error := NULL;
    BEGIN
      v_ended := pg_terminate_backend(r.pid, v_wait_ms);
    EXCEPTION WHEN OTHERS THEN
      v_ended := false;
      v_error := SQLERRM;
    END;
    IF v_ended THEN
      v_count := v_count + 1;
    ELSE
      UPDATE shardlease.leases SET unkillable_since = clock_timestamp() WHERE incarnation = r.incarnation;
      RAISE WARNING 'shardlease: could not end backend % of the expired lease of member "%" (slot %) in group "%": %; the lease is kept until it can be',
        r.pid, r.member_id, r.slot, p_group, coalesce(v_error, format('it did not exit within %s ms', v_wait_ms));
    END IF;
  END LOOP;
  RETURN v_count;
END
$$;
COMMENT ON FUNCTION shardlease.terminate_expired(text) IS
  'End the proven backends of the group''s expired leases (the slot lock''s holder, and fenced transactions of that slot) and wait for them to exit; a lease whose backend could not be ended is marked unkillable_since and reported with a WARNING. Scans pg_locks, only when an expired lease exists.';

-- The group's leases whose member is gone: nobody holds the slot lock (probed with a shared
-- try-lock, held to the end of the caller's transaction), or, for the caller's own backend,
-- the lease expired. An expired lease whose lock is still held is NOT dead: its backend must
-- be ended first (terminate_expired).
CREATE OR REPLACE FUNCTION shardlease.dead_leases(p_group text)
RETURNS TABLE (incarnation bigint, slot integer, backend_pid integer, reason text)
LANGUAGE plpgsql AS $$
BEGIN
  RETURN QUERY
    WITH leases AS MATERIALIZED (
      SELECT l.incarnation, l.slot, l.backend_pid, l.expires_at <= clock_timestamp() AS expired, g.lock_key
        FROM shardlease.leases l JOIN shardlease.groups g ON g.name = l.group_name
       WHERE l.group_name = p_group)
    SELECT x.incarnation, x.slot, x.backend_pid,
           CASE WHEN x.expired THEN 'expired' ELSE 'disconnected' END
      FROM leases x
     WHERE (x.backend_pid <> pg_backend_pid() AND pg_try_advisory_xact_lock_shared(x.lock_key, x.slot))
        OR (x.backend_pid = pg_backend_pid() AND x.expired);
END
$$;
COMMENT ON FUNCTION shardlease.dead_leases(text) IS
  'The group''s dead leases: nobody holds the slot lock (a shared try-lock per lease, held to the end of the caller''s transaction), reason expired or disconnected. An expired lease whose lock is still held is not dead until its backend is ended. No pg_locks scan.';

CREATE OR REPLACE FUNCTION shardlease.needs_reap(p_group text)
RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  RETURN EXISTS (SELECT 1 FROM shardlease.leases l
                  WHERE l.group_name = p_group AND l.expires_at <= clock_timestamp()
                    AND l.backend_pid <> pg_backend_pid()
                    AND (l.unkillable_since IS NULL OR l.unkillable_since <= clock_timestamp() - l.ttl))
      OR EXISTS (SELECT 1 FROM shardlease.dead_leases(p_group));
END
$$;
COMMENT ON FUNCTION shardlease.needs_reap(text) IS
  'True when the group has a dead lease (its slot lock is free: one shared try-lock per lease) or an expired one whose backend is to be ended. The group''s checkers poll it.';

-- Delete the given leases of a group whose row the caller holds FOR UPDATE, keep their slots
-- for their members (twice their TTL), shrink S and bump the generation once.
CREATE OR REPLACE FUNCTION shardlease.delete_leases(p_group text, p_slot_count integer,
                                                    p_incarnations bigint[], p_reasons text[])
RETURNS TABLE (member_id text, slot integer, incarnation bigint, reason text, generation bigint)
LANGUAGE plpgsql AS $$
DECLARE
  v_members text[];
  v_slots integer[];
  v_incarnations bigint[];
  v_reasons text[];
  v_until timestamptz[];
  v_generation bigint;
BEGIN
  WITH gone AS (
    DELETE FROM shardlease.leases l
     USING unnest(p_incarnations, p_reasons) AS d(incarnation, reason)
     WHERE l.group_name = p_group AND l.incarnation = d.incarnation
    RETURNING l.member_id, l.slot, l.incarnation, d.reason, clock_timestamp() + 2 * l.ttl AS until)
  SELECT array_agg(x.member_id ORDER BY x.slot), array_agg(x.slot ORDER BY x.slot),
         array_agg(x.incarnation ORDER BY x.slot), array_agg(x.reason ORDER BY x.slot),
         array_agg(x.until ORDER BY x.slot)
    INTO v_members, v_slots, v_incarnations, v_reasons, v_until
    FROM gone x;
  IF v_slots IS NULL THEN
    RETURN;
  END IF;
  DELETE FROM shardlease.slot_reservations r
   WHERE r.group_name = p_group AND (r.member_id = ANY (v_members) OR r.slot = ANY (v_slots)
                                     OR r.reserved_until <= clock_timestamp());
  INSERT INTO shardlease.slot_reservations (group_name, slot, member_id, reserved_until)
  SELECT p_group, u.s, u.m, u.t FROM unnest(v_slots, v_members, v_until) AS u(s, m, t);
  v_generation := shardlease.bump(p_group, shardlease.slot_count_after(p_slot_count, v_slots), 'reap',
                                  jsonb_build_object('gone', to_jsonb(v_incarnations)));
  RETURN QUERY
    SELECT u.m, u.s, u.i, u.r, v_generation
      FROM unnest(v_members, v_slots, v_incarnations, v_reasons) AS u(m, s, i, r);
END
$$;
COMMENT ON FUNCTION shardlease.delete_leases(text, integer, bigint[], text[]) IS
  'Internal: delete the given leases (by incarnation, with the reason to report), reserve their slots for their members for twice their TTL, shrink S and bump the generation once; the caller holds the group row FOR UPDATE.';

-- Dead leases go, and expired leases whose backend could not be ended are reported (reason
-- unkillable, no generation) and kept.
CREATE OR REPLACE FUNCTION shardlease.reap_locked(p_group text, p_lock_key integer, p_slot_count integer)
RETURNS TABLE (member_id text, slot integer, incarnation bigint, reason text, generation bigint)
LANGUAGE plpgsql AS $$
DECLARE
  v_incarnations bigint[];
  v_reasons text[];
BEGIN
  SELECT array_agg(d.incarnation), array_agg(d.reason) INTO v_incarnations, v_reasons
    FROM shardlease.dead_leases(p_group) d;
  IF v_incarnations IS NOT NULL THEN
    RETURN QUERY SELECT * FROM shardlease.delete_leases(p_group, p_slot_count, v_incarnations, v_reasons);
  END IF;
  RETURN QUERY
    SELECT l.member_id, l.slot, l.incarnation, 'unkillable'::text, NULL::bigint
      FROM shardlease.leases l
     WHERE l.group_name = p_group AND l.unkillable_since >= now();
END
$$;
COMMENT ON FUNCTION shardlease.reap_locked(text, integer, integer) IS
  'Internal: delete the group''s dead leases (see dead_leases) and return them; also return, with reason unkillable and no generation, the expired leases this transaction could not end the backend of (they are kept). The caller holds the group row FOR UPDATE.';

CREATE OR REPLACE FUNCTION shardlease.joiner_reapable(p_group text, p_member text)
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
     WHERE (c.backend_pid <> pg_backend_pid() AND pg_try_advisory_xact_lock_shared(g.lock_key, c.slot))
        OR (c.backend_pid = pg_backend_pid() AND c.expired);
END
$$;
COMMENT ON FUNCTION shardlease.joiner_reapable(text, text) IS
  'Internal: the leases a joiner reaps: the checkers'' (three lowest slots) and its own member id''s, when their slot lock is free (an expired one''s backend is ended first). Index lookups only.';

CREATE OR REPLACE FUNCTION shardlease.join(p_group text, p_member text, p_ttl interval,
                                           p_metadata jsonb, p_protocol integer)
RETURNS TABLE (slot integer, incarnation bigint, generation bigint, slot_count integer,
               lock_key integer, expires_at timestamptz)
LANGUAGE plpgsql AS $$
DECLARE
  g shardlease.groups;
  v_slot integer;
  v_reserved integer;
  v_slot_count integer;
  v_timeline bigint;
  v_incarnation bigint;
  v_generation bigint;
  v_expires timestamptz;
  v_reap bigint[];
  v_reasons text[];
BEGIN
  v_timeline := shardlease.timeline();
  IF v_timeline IS NULL THEN
    RAISE EXCEPTION 'shardlease: this server is a standby (in recovery): members join on the primary'
      USING ERRCODE = '25006';
  END IF;
  INSERT INTO shardlease.groups (name, protocol_version) VALUES (p_group, p_protocol)
    ON CONFLICT (name) DO NOTHING;
  SELECT * INTO g FROM shardlease.groups WHERE name = p_group FOR UPDATE;
  -- End the backends of expired checkers (or of our own id's expired lease) first: their
  -- leases are reaped below only once their slot locks are free.
  IF EXISTS (SELECT 1 FROM (
               (SELECT l.expires_at FROM shardlease.leases l
                 WHERE l.group_name = p_group ORDER BY l.slot LIMIT 3)
               UNION ALL
               (SELECT l.expires_at FROM shardlease.leases l
                 WHERE l.group_name = p_group AND l.member_id = p_member)) c
              WHERE c.expires_at <= clock_timestamp()) THEN
    PERFORM shardlease.terminate_expired(p_group);
  END IF;
  SELECT array_agg(r.incarnation), array_agg(r.reason) INTO v_reap, v_reasons
    FROM shardlease.joiner_reapable(p_group, p_member) r;
  IF v_reap IS NOT NULL THEN
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
      USING ERRCODE = 'SLM01',
      HINT = 'Another process runs under this id, or the backend of its expired lease could not be ended (see shardlease.leases.unkillable_since).';
  END IF;

  IF EXISTS (SELECT 1 FROM shardlease.leases l WHERE l.group_name = p_group AND l.slot >= g.slot_count) THEN
    RAISE EXCEPTION 'shardlease: group "%" has a lease in slot % or above, but its slot count is %',
      p_group, g.slot_count, g.slot_count USING ERRCODE = 'SLI01',
      HINT = 'A hand edit? Set shardlease.groups.slot_count above every lease''s slot, or delete the stray lease.';
  END IF;

  -- Our own reservation, if we were reaped lately: that slot again, when it is still vacant.
  DELETE FROM shardlease.slot_reservations r
   WHERE r.group_name = p_group AND r.member_id = p_member AND r.reserved_until > clock_timestamp()
  RETURNING r.slot INTO v_reserved;
  DELETE FROM shardlease.slot_reservations r
   WHERE r.group_name = p_group AND (r.member_id = p_member OR r.reserved_until <= clock_timestamp());
  IF v_reserved IS NOT NULL
     AND NOT EXISTS (SELECT 1 FROM shardlease.leases l WHERE l.group_name = p_group AND l.slot = v_reserved) THEN
    v_slot := v_reserved;
  ELSE
    -- The lowest slot neither taken nor kept for another member: the first that differs
    -- from its rank, in one ordered scan; with no gap, the next after the last.
    WITH taken AS MATERIALIZED (
      SELECT l.slot FROM shardlease.leases l WHERE l.group_name = p_group
      UNION
      SELECT r.slot FROM shardlease.slot_reservations r WHERE r.group_name = p_group)
    SELECT coalesce(
             (SELECT min(x.rank) FROM (SELECT t.slot, row_number() OVER (ORDER BY t.slot) - 1 AS rank
                                         FROM taken t) x
               WHERE x.slot <> x.rank),
             (SELECT count(*) FROM taken))
      INTO v_slot;
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

  v_incarnation := (v_timeline << 40) | (nextval('shardlease.incarnation_seq') & ((1::bigint << 40) - 1));
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
COMMENT ON FUNCTION shardlease.join(text, text, interval, jsonb, integer) IS
  'Join a group in one transaction: lock the group row, end the backends of expired checkers, reap the checkers (three lowest slots) and this member id''s earlier lease if they are dead, take this member''s reserved slot if it has one, else the lowest slot neither taken nor reserved (or slot S, S grows), take the session advisory lock, insert the lease (its incarnation carries the timeline), bump the generation and queue the announcement. Call it on the member''s dedicated session connection.';

CREATE OR REPLACE FUNCTION shardlease.heartbeat(p_incarnation bigint, p_probe_slots integer[],
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
     AND le.expires_at > clock_timestamp()
     -- a lease of another timeline (before a failover) is lost
     AND shardlease.incarnation_timeline(le.incarnation) = shardlease.timeline();
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
  'Heartbeat: when less than p_renew_below is left, extend a live lease by its ttl on the database clock (asynchronous commit); return the lease''s expiry, and the group''s generation as last announced (the current one if announcements have stalled for a second): a view older than that is re-read. Probes the slot locks of p_probe_slots (the checkers): suspect is true when one of them is gone or expired. No row back means the lease is lost (reaped, expired, or taken on another timeline).';

CREATE OR REPLACE FUNCTION shardlease.fence_begin(p_group text, p_incarnation bigint, p_generation bigint)
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
  IF shardlease.incarnation_timeline(p_incarnation) IS DISTINCT FROM shardlease.timeline() THEN
    RETURN QUERY SELECT 'other_timeline'::text, v_generation;
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
  'Fenced transaction, first statement: check (without locking) that the lease was taken on this timeline, the generation is still p_generation and the lease live, and mark the transaction as the member''s. Status ok, other_timeline, stale_generation, lease_gone, lease_expired or no_group.';

CREATE FUNCTION shardlease.fence_guard(p_group text, p_incarnation bigint, p_generation bigint)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  v_status text;
  v_generation bigint;
BEGIN
  SELECT b.status, b.current_generation INTO v_status, v_generation
    FROM shardlease.fence_begin(p_group, p_incarnation, p_generation) b;
  IF v_status IS DISTINCT FROM 'ok' THEN
    RAISE EXCEPTION 'shardlease fence: %', coalesce(v_status, 'no_group') USING ERRCODE = 'SLX01',
      DETAIL = format('current generation %s, fence generation %s', coalesce(v_generation::text, 'unknown'), p_generation),
      HINT = 'The membership changed since the view this transaction was computed from: refresh the view and retry.';
  END IF;
END
$$;
COMMENT ON FUNCTION shardlease.fence_guard(text, bigint, bigint) IS
  'Fenced transaction, first statement when the rest is pipelined behind it: fence_begin, raising SLX01 (as fence_commit does) instead of returning a status, so that the transaction is aborted before a stale member''s statement touches (and locks) a row.';

CREATE OR REPLACE FUNCTION shardlease.fence_commit(p_incarnation bigint, p_generation bigint,
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
    WHEN shardlease.incarnation_timeline(p_incarnation) IS DISTINCT FROM shardlease.timeline() THEN 'other_timeline'
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
  'Fenced transaction, last statement, sent together with COMMIT: under the group''s shared fence lock (lock_key, -1), check that the lease was taken on this timeline, the generation is still p_generation and the lease live; else raise SLX01 (the message names the reason), so that the COMMIT never runs.';

-- Rejoin storms ---------------------------------------------------------------------------

-- After a restart the whole group joins again at once, as at a cold start. A join's
-- announcement wakes every member, and each then works out its share again: hold joins
-- back for 1 ms per slot, at most 250 ms (V2: 0.1 ms, at most 100 ms), so that a burst
-- wakes a group of S members at most 1,000 times a second up to 250 members and 4·S
-- beyond. Departures are still announced at once.
CREATE OR REPLACE FUNCTION shardlease.announce_gap(p_slot_count integer) RETURNS interval
LANGUAGE sql IMMUTABLE AS $$
  SELECT least(interval '250 milliseconds', p_slot_count * interval '1 millisecond')
$$;
COMMENT ON FUNCTION shardlease.announce_gap(integer) IS
  'The least interval between two announcements of joins in a group of p_slot_count slots (1 ms per slot, at most 250 ms): joins in between are announced together.';
