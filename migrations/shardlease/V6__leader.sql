-- shardlease V6: leader election.
--
-- * The leader of a group is its longest-standing member: the lease with the lowest
--   incarnation among those taken on the server's current timeline. A join always takes a
--   higher incarnation than every lease of the group (joins hold the group row and draw from
--   one sequence), so a joiner, or a member that comes back, never preempts a live leader.
--   Leadership moves only when the leader's lease is deleted (a leave or a reap), which is a
--   membership change.
-- * A leader transaction commits only while its member leads: leader_fence_begin and
--   leader_fence_commit are the counterparts of fence_begin and fence_commit, checked under
--   the same shared fence lock (lock_key, -1) that every membership change takes exclusively
--   before it commits. So the change that deposes a leader cannot commit between the check
--   and the leader's COMMIT, and a change that does not touch the leader (a follower joins
--   or leaves) does not refuse the leader's writes.
-- * await_departure: each candidate keeps one statement waiting on the slot lock of the
--   candidate before it in incarnation order (the leader's successor waits on the leader's),
--   and reaps the group the instant that member's backend is gone, on the server, without a
--   round trip. The wait is bounded (p_wait_ms) and re-armed by the caller, because a
--   waiting statement holds a snapshot, and with it the database's xmin horizon (vacuum).
--
-- Nothing of V1 to V3 changes: members that do not use the leader API behave as before.

CREATE INDEX leases_group_incarnation ON shardlease.leases (group_name, incarnation);
COMMENT ON INDEX shardlease.leases_group_incarnation IS
  'The group''s leases in incarnation order: the leader (the lowest incarnation of the current timeline) in one index probe.';

-- The leader's incarnation: the group's lowest of the current timeline (NULL: no leader, or
-- a standby, where nothing can be fenced).
CREATE FUNCTION shardlease.leader_incarnation(p_group text) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  v_timeline bigint := shardlease.timeline();
BEGIN
  RETURN (SELECT min(l.incarnation) FROM shardlease.leases l
           WHERE l.group_name = p_group
             AND l.incarnation >= (v_timeline << 40) AND l.incarnation < ((v_timeline + 1) << 40));
END
$$;
COMMENT ON FUNCTION shardlease.leader_incarnation(text) IS
  'The incarnation of the group''s leader: its longest-standing member, the lowest incarnation among the leases taken on the current timeline; NULL when the group has none (or on a standby).';

-- Leader transactions, step 1: the first statement. Checks without locking anything of the
-- group, so that a deposed leader fails fast.
CREATE FUNCTION shardlease.leader_fence_begin(p_group text, p_incarnation bigint)
RETURNS TABLE (status text, current_generation bigint)
LANGUAGE plpgsql AS $$
DECLARE
  v_generation bigint;
  v_lock_key integer;
  l shardlease.leases;
BEGIN
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
  IF shardlease.leader_incarnation(p_group) IS DISTINCT FROM p_incarnation THEN
    RETURN QUERY SELECT 'not_leader'::text, v_generation;
    RETURN;
  END IF;
  -- Mark this transaction as the member's (terminate_expired ends it with the member).
  PERFORM pg_advisory_xact_lock_shared(v_lock_key, 1073741824 + l.slot);
  RETURN QUERY SELECT 'ok'::text, v_generation;
END
$$;
COMMENT ON FUNCTION shardlease.leader_fence_begin(text, bigint) IS
  'Leader transaction, first statement: check (without locking) that the lease was taken on this timeline, is live, and leads the group (the lowest incarnation), and mark the transaction as the member''s. Status ok, other_timeline, lease_gone, lease_expired, not_leader or no_group.';

-- Leader transactions, step 2: sent with COMMIT in one message. Raises SLX01 when the
-- member no longer leads.
CREATE FUNCTION shardlease.leader_fence_commit(p_incarnation bigint, p_lock_timeout_ms integer)
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
  v_group text;
  v_lock_key integer;
  v_generation bigint;
  v_expires timestamptz;
  v_leader bigint;
  v_status text;
BEGIN
  PERFORM set_config('lock_timeout', p_lock_timeout_ms || 'ms', true);
  SELECT l.group_name INTO v_group FROM shardlease.leases l WHERE l.incarnation = p_incarnation;
  IF FOUND THEN
    IF current_setting('transaction_isolation') = 'read committed' THEN
      SELECT g.lock_key INTO v_lock_key FROM shardlease.groups g WHERE g.name = v_group;
      PERFORM pg_advisory_xact_lock_shared(v_lock_key, -1);
      -- New snapshots from here on, taken after the lock: no membership change can commit
      -- until this transaction has.
      SELECT g.generation INTO v_generation FROM shardlease.groups g WHERE g.name = v_group;
    ELSE
      -- A transaction snapshot is older than the lock would be: lock the row instead, which
      -- fails with a serialization error if a change committed since the snapshot.
      SELECT g.generation INTO v_generation FROM shardlease.groups g WHERE g.name = v_group FOR SHARE;
    END IF;
    SELECT l.expires_at INTO v_expires FROM shardlease.leases l WHERE l.incarnation = p_incarnation;
    v_leader := shardlease.leader_incarnation(v_group);
  END IF;
  v_status := CASE
    WHEN shardlease.incarnation_timeline(p_incarnation) IS DISTINCT FROM shardlease.timeline() THEN 'other_timeline'
    WHEN v_group IS NULL OR v_expires IS NULL THEN 'lease_gone'
    WHEN v_expires <= clock_timestamp() THEN 'lease_expired'
    WHEN v_leader IS DISTINCT FROM p_incarnation THEN 'not_leader'
  END;
  IF v_status IS NOT NULL THEN
    RAISE EXCEPTION 'shardlease fence: %', v_status USING ERRCODE = 'SLX01',
      DETAIL = format('current generation %s, leader incarnation %s, fence incarnation %s',
                      coalesce(v_generation::text, 'unknown'), coalesce(v_leader::text, 'none'), p_incarnation),
      HINT = 'This member no longer leads the group: stop acting as its leader, and follow the new one.';
  END IF;
END
$$;
COMMENT ON FUNCTION shardlease.leader_fence_commit(bigint, integer) IS
  'Leader transaction, last statement, sent together with COMMIT: under the group''s shared fence lock (lock_key, -1), check that the lease was taken on this timeline, is live and still leads the group (the lowest incarnation); else raise SLX01 (the message names the reason), so that the COMMIT never runs.';

-- A candidate's watcher: wait until the member of incarnation p_incarnation is gone (its
-- session's slot lock is free), then reap the group. Waits at most p_wait_ms; the reap's own
-- lock waits are bounded by p_lock_timeout_ms.
CREATE FUNCTION shardlease.await_departure(p_group text, p_incarnation bigint, p_wait_ms integer,
                                           p_lock_timeout_ms integer)
RETURNS TABLE (status text, reaped integer)
LANGUAGE plpgsql AS $$
DECLARE
  v_slot integer;
  v_lock_key integer;
  v_expired boolean;
  v_reaped integer;
BEGIN
  SELECT l.slot, g.lock_key, l.expires_at <= clock_timestamp()
    INTO v_slot, v_lock_key, v_expired
    FROM shardlease.leases l JOIN shardlease.groups g ON g.name = l.group_name
   WHERE l.group_name = p_group AND l.incarnation = p_incarnation;
  IF NOT FOUND THEN
    RETURN QUERY SELECT 'gone'::text, 0;
    RETURN;
  END IF;
  IF NOT v_expired THEN
    -- The member holds its slot lock exclusively for as long as its session lives: a shared
    -- request is granted the instant its backend is gone (or it leaves).
    PERFORM set_config('lock_timeout', greatest(p_wait_ms, 1) || 'ms', true);
    BEGIN
      PERFORM pg_advisory_xact_lock_shared(v_lock_key, v_slot);
    EXCEPTION WHEN lock_not_available THEN
      RETURN QUERY SELECT 'waiting'::text, 0;
      RETURN;
    END;
  END IF;
  -- Gone, or expired: reap (an expired member's proven backends are ended first).
  PERFORM set_config('lock_timeout', greatest(p_lock_timeout_ms, 1) || 'ms', true);
  SELECT count(*) INTO v_reaped FROM shardlease.reap(p_group) r WHERE r.generation IS NOT NULL;
  RETURN QUERY SELECT 'departed'::text, v_reaped;
END
$$;
COMMENT ON FUNCTION shardlease.await_departure(text, bigint, integer, integer) IS
  'Wait, at most p_wait_ms, until the member of lease p_incarnation is gone (its slot lock is free: a shared lock request, granted the instant its backend ends), then reap the group. Status gone (no such lease), waiting (still held: call again) or departed (with how many leases were reaped). A waiting statement holds a snapshot, and with it the xmin horizon: keep p_wait_ms short enough for vacuum. Leader candidates call it on a connection of their own.';

CREATE VIEW shardlease.leaders AS
SELECT l.group_name,
       l.member_id,
       l.slot,
       l.incarnation,
       l.joined_at,
       date_trunc('milliseconds', l.expires_at - clock_timestamp()) AS expires_in,
       (SELECT count(*) FROM shardlease.leases c WHERE c.group_name = l.group_name) AS candidates
  FROM shardlease.groups g
  JOIN shardlease.leases l ON l.group_name = g.name AND l.incarnation = shardlease.leader_incarnation(g.name);
COMMENT ON VIEW shardlease.leaders IS
  'The leader of each group: its longest-standing member (lowest incarnation of the current timeline). Meaningful for groups whose members elect a leader (shardlease::Leader).';
COMMENT ON COLUMN shardlease.leaders.group_name IS 'The group.';
COMMENT ON COLUMN shardlease.leaders.member_id IS 'The leader''s member id.';
COMMENT ON COLUMN shardlease.leaders.slot IS 'The leader''s slot.';
COMMENT ON COLUMN shardlease.leaders.incarnation IS 'The leader''s lease incarnation: the lowest of the group on the current timeline.';
COMMENT ON COLUMN shardlease.leaders.joined_at IS 'When the leader joined (database clock); it has led since its predecessor departed.';
COMMENT ON COLUMN shardlease.leaders.expires_in IS 'Time left on the leader''s lease (database clock); negative when expired and not reaped yet.';
COMMENT ON COLUMN shardlease.leaders.candidates IS 'How many members the group has (every member of a leader group is a candidate).';

-- Roles (V4): the functions members call run as their owner with a pinned search_path, and
-- nobody but the owner calls anything unless granted (shardlease::roles::grant gives members
-- the leader functions, and members and inspectors leader_incarnation, which the leaders
-- view calls).
ALTER FUNCTION shardlease.leader_fence_begin(text, bigint)
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION shardlease.leader_fence_commit(bigint, integer)
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
ALTER FUNCTION shardlease.await_departure(text, bigint, integer, integer)
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE EXECUTE ON FUNCTION
  shardlease.leader_incarnation(text),
  shardlease.leader_fence_begin(text, bigint),
  shardlease.leader_fence_commit(bigint, integer),
  shardlease.await_departure(text, bigint, integer, integer)
  FROM PUBLIC;
