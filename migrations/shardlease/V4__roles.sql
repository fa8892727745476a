-- shardlease V4: least-privilege roles.
--
-- A member role (the workers) and an inspector role (psql users) get their privileges from
-- `shardlease::roles::grant` (`shardlease-worker grant`), run by the schema owner. This
-- migration makes those privileges enough, and no more than enough:
--
-- * The functions a member calls run with their owner's rights (SECURITY DEFINER, with a
--   pinned search_path, so that no object of the caller's can stand in for a system one).
--   Members therefore need no write privilege on any table: they change memberships only
--   through the protocol, and delete no lease but their own or a dead member's.
-- * leave() leaves only the caller's own lease. It deleted any lease by incarnation, and every
--   member can read every incarnation. The unchecked version stays, for the schema owner, as
--   shardlease.evict().
-- * Nobody but the owner may call the other functions: EXECUTE is revoked from PUBLIC, which
--   PostgreSQL grants it on every new function. A later migration that creates a function must
--   revoke it too (a per-schema ALTER DEFAULT PRIVILEGES cannot revoke what PostgreSQL grants by
--   default, and a global one would change the migrating role's functions in every schema);
--   the roles test checks it. The stable key hashes keep it: users' tables compute generated
--   columns with them, and they read nothing.
--
-- The reaper ends only backends proven to be an expired member's: the backend holding the
-- lease's slot lock, or one inside a fenced transaction of its slot (terminate_expired). It
-- runs with the owner's rights, so a superuser owner can end any such backend; a non-superuser
-- owner needs pg_signal_backend, or membership in the member role, to end a hung member's.

-- leave: the caller's own lease only (its session backend is the lease's backend_pid).
ALTER FUNCTION shardlease.leave(bigint) RENAME TO evict;
COMMENT ON FUNCTION shardlease.evict(bigint) IS
  'Remove a lease as a graceful leave does (delete it, shrink S if it was the top slot, bump the generation, announce), whoever holds it. For the schema owner, to evict a member by hand; members call shardlease.leave. Returns the new generation, or NULL when the lease was already gone.';

CREATE FUNCTION shardlease.leave(p_incarnation bigint)
RETURNS bigint LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
  v_pid integer;
BEGIN
  SELECT l.backend_pid INTO v_pid FROM shardlease.leases l WHERE l.incarnation = p_incarnation;
  IF NOT FOUND THEN
    RETURN NULL;
  END IF;
  IF v_pid <> pg_backend_pid() THEN
    RAISE EXCEPTION 'shardlease: lease % is held by backend %, not by this one: a member leaves only its own lease',
      p_incarnation, v_pid USING ERRCODE = '42501',
      HINT = 'Call leave on the session connection that joined. Dead members are reaped with shardlease.reap; the schema owner evicts with shardlease.evict.';
  END IF;
  RETURN shardlease.evict(p_incarnation);
END
$$;
COMMENT ON FUNCTION shardlease.leave(bigint) IS
  'Leave gracefully in one transaction: delete the caller''s own lease (held by this backend; another''s is refused with SQLSTATE 42501), shrink S if it was the top slot, bump the generation, announce. Returns the new generation, or NULL when the lease was already gone. The caller then releases its advisory lock.';

-- The functions members call run with the owner's rights, with a pinned search_path (every
-- overload: also those a rolling upgrade keeps for older members).
DO $$
DECLARE
  v_name text;
  v_fn regprocedure;
BEGIN
  FOREACH v_name IN ARRAY ARRAY['join', 'heartbeat', 'leave', 'reap', 'needs_reap',
                                'flush_announcements', 'fence_begin', 'fence_guard', 'fence_commit'] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_proc p
                    WHERE p.pronamespace = 'shardlease'::regnamespace AND p.proname = v_name) THEN
      RAISE EXCEPTION 'shardlease V4: function shardlease.% does not exist', v_name;
    END IF;
    FOR v_fn IN SELECT p.oid::regprocedure FROM pg_proc p
                 WHERE p.pronamespace = 'shardlease'::regnamespace AND p.proname = v_name LOOP
      EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER SET search_path = pg_catalog, pg_temp', v_fn);
    END LOOP;
  END LOOP;
END
$$;

-- Nobody but the owner calls anything, unless granted (shardlease::roles::grant).
REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA shardlease FROM PUBLIC;
GRANT EXECUTE ON FUNCTION shardlease.uuid_key(uuid), shardlease.str_key(text),
  shardlease.shard_of(uuid) TO PUBLIC;
