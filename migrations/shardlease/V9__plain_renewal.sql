-- shardlease V9: a renewal is one plain UPDATE, through a view of the caller's own lease.
--
-- Until V8 every renewing heartbeat called shardlease.heartbeat: a SECURITY DEFINER PL/pgSQL
-- function, which reads the lease, sets synchronous_commit, updates the lease and returns a
-- row, each statement its own executor run inside a change of user. Measured with pgbench on
-- 2 cores, 1,000 clients each renewing once a second (each backend wakes once a second with
-- cold caches, as a member's does): the function cost 0.53 to 0.93 core, a plain UPDATE of the
-- lease joined to its group 0.27 to 0.31, the same UPDATE through the view below 0.30, a
-- PL/pgSQL function holding only that UPDATE 0.41, and one SELECT 1 per client 0.12. In the
-- scale bench (1,000 members, 500 renewals a second) a renewal took 449 µs of server time at
-- rest before, 220 µs after, most of the difference the probe's fix below.
--
-- Members write no table of the schema (V4), and still do not: they may update two columns of
-- shardlease.own_lease, an auto-updatable view that shows a session its own live lease and
-- nothing else. PostgreSQL checks the base table's privileges as the view's owner, and WITH
-- CHECK OPTION makes every row the member writes satisfy the view's condition again. So a
-- member may extend its own lease, held by its own backend, still live and of the current
-- timeline, by at most its TTL from now, exactly as shardlease.heartbeat does; it cannot revive
-- an expired lease, touch another's, or set its renewal in the future. The view is not a
-- security barrier: a member may read every lease anyway.
--
-- shardlease.heartbeat stays: members of builds before V9 call it, and current members still
-- call it on the beats that probe without renewing (leader groups).

-- The generation a heartbeat reports, one definition for lease_state and the renewal.
-- Inlined into its callers' statements (SQL, a single expression, VOLATILE like its body).
CREATE FUNCTION shardlease.reported_generation(p_generation bigint, p_announced_generation bigint,
                                               p_announced_at timestamptz)
RETURNS bigint LANGUAGE sql VOLATILE AS $$
  -- Changes not yet announced will be, within announce_gap: until then members need not
  -- re-read for them (a burst of joins must not make a thousand members re-read the group at
  -- every beat). Unless announcements have stalled: then the truth.
  SELECT CASE WHEN p_announced_at > clock_timestamp() - interval '1 second'
              THEN p_announced_generation ELSE p_generation END
$$;
COMMENT ON FUNCTION shardlease.reported_generation(bigint, bigint, timestamptz) IS
  'The generation a heartbeat reports to a member: the group''s last announced generation, or its current one if announcements have stalled for a second (arguments: groups.generation, announced_generation, announced_at).';
REVOKE EXECUTE ON FUNCTION shardlease.reported_generation(bigint, bigint, timestamptz) FROM PUBLIC;

CREATE OR REPLACE FUNCTION shardlease.lease_state(p_incarnation bigint)
RETURNS TABLE (group_name text, slot integer, expires_at timestamptz, lock_key integer,
               generation bigint)
LANGUAGE sql STABLE AS $$
  SELECT le.group_name, le.slot, le.expires_at, g.lock_key,
         shardlease.reported_generation(g.generation, g.announced_generation, g.announced_at)
    FROM shardlease.leases le JOIN shardlease.groups g ON g.name = le.group_name
   WHERE le.incarnation = p_incarnation AND le.backend_pid = pg_backend_pid()
     AND le.expires_at > clock_timestamp()
     -- a lease of another timeline (before a failover) is lost
     AND shardlease.incarnation_timeline(le.incarnation) = shardlease.timeline()
$$;

-- The heartbeat's probe tries the lock of the probed slots only. Its filter said
-- `slot = ANY (p_probe_slots) AND ... AND (expired OR pg_try_advisory_xact_lock_shared(...))`,
-- and the order in which a filter's conditions run is the planner's: under a generic plan
-- (members plan their session's statements once) it ran the try-lock on each of the group's
-- leases before testing the slot, 1,000 try-locks on every beat that probed. A CASE fixes the
-- order, and the probed slots drive the lookup, one index probe each. (The result was right
-- either way: a lease outside the probed slots was filtered out after its try-lock.)
CREATE OR REPLACE FUNCTION shardlease.heartbeat(p_incarnation bigint, p_probe_slots integer[],
                                                p_renew_below interval)
RETURNS TABLE (expires_at timestamptz, generation bigint, suspect boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  l record;
  v_suspect boolean := false;
BEGIN
  SELECT s.group_name, s.slot, s.expires_at, s.lock_key, s.generation INTO l
    FROM shardlease.lease_state(p_incarnation) s;
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
      SELECT 1 FROM unnest(p_probe_slots) p(slot)
        JOIN shardlease.leases le ON le.group_name = l.group_name AND le.slot = p.slot
       WHERE CASE WHEN le.slot = ANY (p_probe_slots) AND le.slot <> l.slot
                  THEN le.expires_at <= clock_timestamp()
                       OR pg_try_advisory_xact_lock_shared(l.lock_key, le.slot)
                  ELSE false END) INTO v_suspect;
  END IF;
  RETURN QUERY SELECT l.expires_at, l.generation, v_suspect;
END
$$;

CREATE VIEW shardlease.own_lease AS
  SELECT l.group_name, l.slot, l.incarnation, l.ttl, l.renewed_at, l.expires_at
    FROM shardlease.leases l
   WHERE l.backend_pid = pg_backend_pid()
     AND l.expires_at > clock_timestamp()
     AND l.expires_at <= clock_timestamp() + l.ttl
     AND l.renewed_at <= clock_timestamp()
     -- a lease of another timeline (before a failover) is lost
     AND shardlease.incarnation_timeline(l.incarnation) = shardlease.timeline()
  WITH CASCADED CHECK OPTION;
COMMENT ON VIEW shardlease.own_lease IS
  'The caller''s own live lease: held by this session''s backend, not expired, of the current timeline. Members renew through it (UPDATE of renewed_at and expires_at); WITH CHECK OPTION keeps every renewal within the lease''s TTL from now.';
COMMENT ON COLUMN shardlease.own_lease.group_name IS 'The group (leases.group_name).';
COMMENT ON COLUMN shardlease.own_lease.slot IS 'The lease''s slot (leases.slot).';
COMMENT ON COLUMN shardlease.own_lease.incarnation IS 'The lease''s incarnation (leases.incarnation).';
COMMENT ON COLUMN shardlease.own_lease.ttl IS 'The lease''s time-to-live (leases.ttl).';
COMMENT ON COLUMN shardlease.own_lease.renewed_at IS 'Last renewal, by the database clock; a renewal sets it to clock_timestamp().';
COMMENT ON COLUMN shardlease.own_lease.expires_at IS 'Expiry, by the database clock; a renewal sets it to clock_timestamp() + ttl, and may set it no later.';
REVOKE ALL ON shardlease.own_lease FROM PUBLIC;

-- The member roles granted before this version (those that may heartbeat) may renew through
-- the view, so that a running group needs no new grant (shardlease::roles::grant grants the
-- same), and may call reported_generation (lease_state, which they call, calls it).
DO $$
DECLARE
  v_grantee regrole;
BEGIN
  FOR v_grantee IN
    SELECT DISTINCT a.grantee::regrole
      FROM pg_proc p, aclexplode(p.proacl) a
     WHERE p.oid = 'shardlease.heartbeat(bigint,integer[],interval)'::regprocedure
       AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner
  LOOP
    EXECUTE format('GRANT SELECT, UPDATE (renewed_at, expires_at) ON shardlease.own_lease TO %s',
                   v_grantee);
    EXECUTE format('GRANT EXECUTE ON FUNCTION '
                   'shardlease.reported_generation(bigint, bigint, timestamptz) TO %s', v_grantee);
  END LOOP;
END
$$;
