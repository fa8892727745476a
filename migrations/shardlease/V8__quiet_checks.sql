-- shardlease V8: crash checks and heartbeats that cost less at rest.
--
-- Until V7 each of a group's three checkers probed every lease's slot lock ten times a
-- second (needs_reap(text): a shared try-lock per lease). A try-lock that fails, because the
-- member is alive, takes about 6 µs, so at 1,000 members each check took 3 to 10 ms of server
-- time, and the checks cost 0.1 to 0.3 core at rest: as much as all 1,000 heartbeats together
-- on some machines.
--
-- A crashed member's backend ends, and PostgreSQL counts every session of the database that
-- ends other than by its client's own goodbye: client gone (sessions_abandoned: kill -9, a
-- crash, a reset connection), ended (sessions_killed: pg_terminate_backend) or a FATAL error
-- (sessions_fatal). The backend releases its advisory locks before it counts itself
-- (ShutdownPostgres runs before the statistics' shutdown hook), so once the count has moved,
-- the dead member's slot lock is free. needs_reap(text, bigint) takes the count its caller saw
-- at its last check and probes the slot locks only when the count has moved since (or when
-- the caller passes NULL): a check at rest is one look at the expiries and one read of a
-- shared counter. A session that ends with its client's goodbye (Terminate) is not counted;
-- the library's checkers therefore still probe everything once per heartbeat, which bounds
-- the detection of such an end (a member that closes its session without leaving).
--
-- Only on PostgreSQL 15 and later, whose statistics live in shared memory: on 14 the counters
-- come from the statistics collector's file, late and at a cost, so ended_sessions() is NULL
-- there and every check probes, as before. Members of older builds keep calling
-- needs_reap(text), which is unchanged.
--
-- Also: the leases table leaves half of each page free (fillfactor 50), so that the renewals,
-- which change no indexed column, stay heap-only updates on their page; before, pages filled
-- with renewals spilled over, the table grew to hundreds of pages for 1,000 rows, and the
-- checkers' scan of it grew with it. The groups table (one hot row per group) likewise.
-- Applies to pages filled from now on; nothing is rewritten.

ALTER TABLE shardlease.leases SET (fillfactor = 50);
ALTER TABLE shardlease.groups SET (fillfactor = 50);

DO $$
BEGIN
  IF current_setting('server_version_num')::int >= 150000 THEN
    CREATE FUNCTION shardlease.ended_sessions() RETURNS bigint
    LANGUAGE plpgsql VOLATILE
    SET stats_fetch_consistency = none
    AS $f$
    BEGIN
      RETURN (SELECT pg_stat_get_db_sessions_abandoned(d.oid) + pg_stat_get_db_sessions_killed(d.oid)
                     + pg_stat_get_db_sessions_fatal(d.oid)
                FROM pg_database d WHERE d.datname = current_database());
    END
    $f$;
  ELSE
    CREATE FUNCTION shardlease.ended_sessions() RETURNS bigint
    LANGUAGE sql IMMUTABLE AS $f$ SELECT NULL::bigint $f$;
  END IF;
END
$$;
COMMENT ON FUNCTION shardlease.ended_sessions() IS
  'How many sessions of this database have ended without their client''s goodbye (client gone, terminated, FATAL), from the shared statistics: it moves after a crashed member''s backend has released its locks. NULL before PostgreSQL 15 (no shared-memory statistics).';
REVOKE EXECUTE ON FUNCTION shardlease.ended_sessions() FROM PUBLIC;

CREATE FUNCTION shardlease.needs_reap(p_group text, p_ended_sessions bigint)
RETURNS TABLE (needs_reap boolean, ended_sessions bigint, probed boolean)
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
  -- Read before the probe: a backend that ends after this read moves the count again.
  v_ended bigint := shardlease.ended_sessions();
  v_probe boolean;
BEGIN
  v_probe := p_ended_sessions IS NULL OR v_ended IS NULL OR v_ended <> p_ended_sessions;
  RETURN QUERY SELECT
    EXISTS (SELECT 1 FROM shardlease.leases l
             WHERE l.group_name = p_group AND l.expires_at <= clock_timestamp()
               AND l.backend_pid <> pg_backend_pid()
               AND (l.unkillable_since IS NULL OR l.unkillable_since <= clock_timestamp() - l.ttl))
    OR (v_probe AND EXISTS (SELECT 1 FROM shardlease.dead_leases(p_group))),
    v_ended, v_probe;
END
$$;
COMMENT ON FUNCTION shardlease.needs_reap(text, bigint) IS
  'needs_reap(text) for the group''s checkers, probing slot locks only when it may find something: true when the group has an expired lease to reap or end, or (probed) a dead one. The slot locks are probed when p_ended_sessions is NULL or differs from ended_sessions() (a session of the database has ended since the caller''s last check), or when that count is unknown. Returns the count read before probing, for the caller''s next check.';

-- Roles (V4): runs as its owner with a pinned search_path.
ALTER FUNCTION shardlease.needs_reap(text, bigint)
  SECURITY DEFINER SET search_path = pg_catalog, pg_temp;
REVOKE EXECUTE ON FUNCTION shardlease.needs_reap(text, bigint) FROM PUBLIC;

-- The heartbeat's read, as a plain statement ------------------------------------------------
--
-- Most heartbeats renew nothing (a renewal writes every other beat) and probe nothing (a
-- member that is not a checker probes the checkers every fourth beat). Those beats now run
-- one plain prepared statement on shardlease.lease_state, inlined into it, with the member's
-- own rights (it reads groups and leases): no PL/pgSQL, no change of user. Measured at 1,000
-- members on 2 cores, a PL/pgSQL heartbeat cost 0.3 to 0.4 ms of server time in situ (each
-- backend runs once a second, with cold caches). The member itself tells the beats apart by
-- its own monotonic clock: a beat at least 1.25 heartbeats after the last renewal was sent
-- calls shardlease.heartbeat, which renews when the database clock says so, as before.

-- A live lease of this backend on the current timeline, with the group's generation as the
-- heartbeat reports it. Inlined into its caller's query (SQL, STABLE, not STRICT).
CREATE FUNCTION shardlease.lease_state(p_incarnation bigint)
RETURNS TABLE (group_name text, slot integer, expires_at timestamptz, lock_key integer,
               generation bigint)
LANGUAGE sql STABLE AS $$
  SELECT le.group_name, le.slot, le.expires_at, g.lock_key,
         -- Changes not yet announced will be, within announce_gap: until then members need
         -- not re-read for them (a burst of joins must not make a thousand members re-read
         -- the group at every beat). Unless announcements have stalled: then the truth.
         CASE WHEN g.announced_at > clock_timestamp() - interval '1 second'
              THEN g.announced_generation ELSE g.generation END
    FROM shardlease.leases le JOIN shardlease.groups g ON g.name = le.group_name
   WHERE le.incarnation = p_incarnation AND le.backend_pid = pg_backend_pid()
     AND le.expires_at > clock_timestamp()
     -- a lease of another timeline (before a failover) is lost
     AND shardlease.incarnation_timeline(le.incarnation) = shardlease.timeline()
$$;
COMMENT ON FUNCTION shardlease.lease_state(bigint) IS
  'The caller''s lease p_incarnation if it is live, held by this backend and of the current timeline, with the group''s lock key and its generation as last announced (the current one if announcements have stalled for a second); no row otherwise. What a heartbeat reads; members call it directly on the beats that renew and probe nothing.';

-- The heartbeat reads through lease_state too: one definition of a live lease.
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
      SELECT 1 FROM shardlease.leases le
       WHERE le.group_name = l.group_name AND le.slot = ANY (p_probe_slots) AND le.slot <> l.slot
         AND (le.expires_at <= clock_timestamp()
              OR pg_try_advisory_xact_lock_shared(l.lock_key, le.slot))) INTO v_suspect;
  END IF;
  RETURN QUERY SELECT l.expires_at, l.generation, v_suspect;
END
$$;

-- Roles (V4): members read their lease with their own rights; nobody else may.
REVOKE EXECUTE ON FUNCTION shardlease.lease_state(bigint) FROM PUBLIC;

-- The member roles granted before this version (those that may heartbeat) get what a member
-- of this version calls, so that a running group needs no new grant (shardlease::roles::grant
-- grants the same).
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
    EXECUTE format('GRANT EXECUTE ON FUNCTION shardlease.needs_reap(text, bigint), '
                   'shardlease.lease_state(bigint), shardlease.timeline(), '
                   'shardlease.incarnation_timeline(bigint) TO %s', v_grantee);
  END LOOP;
END
$$;
