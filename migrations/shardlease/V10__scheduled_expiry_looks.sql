-- shardlease V10: the checkers look at the leases' expiries only when one may have come due.
--
-- Until V9 every crash check (three checkers, ten checks a second each by default) scanned
-- every lease of the group for an expired one, although at rest the earliest expiry is
-- seconds away: each member renews every other heartbeat, with a TTL of five. At 1,000
-- members that scan took 0.9 to 1.4 ms (the leases' heap-only update chains included), 30
-- times a second: about 0.03 core of the group's 0.38 at rest on 2 cores, and as much again
-- through a cold start.
--
-- needs_reap(text, bigint, boolean) looks at the expiries only when its caller asks, or
-- when it probes the slot locks anyway, and then also says when the earliest lease of
-- another member will be reapable for its expiry: milliseconds from now by the database
-- clock. The checker asks again once that time has come by its own monotonic clock (counted
-- from before it sent the check, so never late by the database's), when its view of the
-- group has moved to another generation (a join may bring a shorter TTL), and at its probe
-- every heartbeat (which also covers a hand edit of expires_at). The decision that a lease
-- has expired is still the database's, by its clock (I5); only the schedule of the looks is
-- the member's. So a hung member is still reaped within a crash check of its lease's expiry,
-- and a check at rest is one read of a shared counter.
--
-- Members of older builds keep calling needs_reap(text, bigint), which is unchanged.

CREATE FUNCTION shardlease.needs_reap(p_group text, p_ended_sessions bigint, p_look_expiries boolean)
RETURNS TABLE (needs_reap boolean, ended_sessions bigint, probed boolean, looked boolean,
               next_expiry_ms bigint)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  -- Read before the probe: a backend that ends after this read moves the count again.
  v_ended bigint := shardlease.ended_sessions();
  v_probe boolean;
  v_look boolean;
  v_next timestamptz;
  v_now timestamptz;
BEGIN
  v_probe := p_ended_sessions IS NULL OR v_ended IS NULL OR v_ended <> p_ended_sessions;
  v_look := p_look_expiries OR v_probe;
  IF v_look THEN
    -- When each other member's lease becomes reapable for its expiry: at expires_at, or,
    -- when its backend could not be ended, one TTL after that was found (greatest() skips
    -- the NULL of a lease that is not unkillable).
    SELECT min(greatest(l.expires_at, l.unkillable_since + l.ttl)) INTO v_next
      FROM shardlease.leases l
     WHERE l.group_name = p_group AND l.backend_pid <> pg_backend_pid();
    v_now := clock_timestamp();
  END IF;
  RETURN QUERY SELECT
    coalesce(v_look AND v_next <= v_now, false)
      OR (v_probe AND EXISTS (SELECT 1 FROM shardlease.dead_leases(p_group))),
    v_ended, v_probe, v_look,
    CASE WHEN v_next IS NOT NULL
         THEN greatest(0, floor(extract(epoch FROM v_next - v_now) * 1000))::bigint END;
END
$$;
COMMENT ON FUNCTION shardlease.needs_reap(text, bigint, boolean) IS
  'needs_reap(text, bigint) for checkers that schedule their looks at the expiries: true when the group has a dead lease (slot locks probed, as there) or, when it looked, a lease to reap or end for its expiry. It looks at the expiries when p_look_expiries is true or when it probes; then next_expiry_ms is how long until the earliest lease of another member becomes reapable for its expiry (0 when one is already; NULL when there is none, or it did not look). Returns the ended-sessions count read before probing, for the caller''s next check.';
REVOKE EXECUTE ON FUNCTION shardlease.needs_reap(text, bigint, boolean) FROM PUBLIC;

-- The member roles granted before this version (those that may heartbeat) may call it, so
-- that a running group needs no new grant (shardlease::roles::grant grants every overload).
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
    EXECUTE format('GRANT EXECUTE ON FUNCTION shardlease.needs_reap(text, bigint, boolean) TO %s',
                   v_grantee);
  END LOOP;
END
$$;
