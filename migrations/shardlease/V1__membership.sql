-- shardlease V1: group membership, leases, change notifications, fencing.
--
-- Plain SQL: `shardlease::migrate` applies it (recorded in shardlease.schema_history,
-- under an advisory lock), and `psql -v ON_ERROR_STOP=1 -f` runs it as well.
--
-- Every membership change is one statement (a function below), so that no client can
-- hold the group row locked while it is stopped between two statements.

CREATE SCHEMA IF NOT EXISTS shardlease;
COMMENT ON SCHEMA shardlease IS
  'shardlease: group membership, leases and fencing for workers that share this database.';

CREATE SEQUENCE shardlease.incarnation_seq AS bigint;
COMMENT ON SEQUENCE shardlease.incarnation_seq IS
  'Source of lease incarnations: every join takes a new, never reused value.';

CREATE TABLE shardlease.groups (
  name             text        PRIMARY KEY CHECK (name <> '' AND length(name) <= 200),
  lock_key         integer     GENERATED ALWAYS AS IDENTITY (START WITH 1397489665) UNIQUE,
  generation       bigint      NOT NULL DEFAULT 0 CHECK (generation >= 0),
  slot_count       integer     NOT NULL DEFAULT 0 CHECK (slot_count >= 0),
  protocol_version integer     NOT NULL CHECK (protocol_version > 0),
  created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
  changed_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
COMMENT ON TABLE shardlease.groups IS
  'One row per group. Every membership change locks the row FOR UPDATE and bumps generation; fenced writes lock it FOR SHARE.';
COMMENT ON COLUMN shardlease.groups.name IS 'Group name, chosen by the members (for the worker: work_items).';
COMMENT ON COLUMN shardlease.groups.lock_key IS
  'First key of the group''s advisory locks: pg_advisory_lock(lock_key, slot) is held by the member in that slot.';
COMMENT ON COLUMN shardlease.groups.generation IS
  'Bumped by every membership change (join, leave, reap). A fenced write commits only under the current generation.';
COMMENT ON COLUMN shardlease.groups.slot_count IS
  'S, the slot high-water mark that the assignment hashes over. Grows by one when a joiner finds no vacant slot; shrinks by exactly one when the top slot''s member departs. Never recomputed as max(slot)+1.';
COMMENT ON COLUMN shardlease.groups.protocol_version IS
  'Version of the assignment function. A member with another version refuses to join while the group has members.';
COMMENT ON COLUMN shardlease.groups.created_at IS 'When the group was created (database clock).';
COMMENT ON COLUMN shardlease.groups.changed_at IS 'When generation last changed (database clock).';

CREATE TABLE shardlease.leases (
  group_name   text        NOT NULL REFERENCES shardlease.groups (name),
  member_id    text        NOT NULL CHECK (member_id <> '' AND length(member_id) <= 200),
  slot         integer     NOT NULL CHECK (slot >= 0 AND slot < 1073741824),
  incarnation  bigint      NOT NULL UNIQUE,
  backend_pid  integer     NOT NULL,
  ttl          interval    NOT NULL CHECK (ttl > interval '0'),
  joined_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
  renewed_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
  expires_at   timestamptz NOT NULL,
  metadata     jsonb       NOT NULL DEFAULT '{}'::jsonb,
  PRIMARY KEY (group_name, slot),
  UNIQUE (group_name, member_id)
);
COMMENT ON TABLE shardlease.leases IS
  'One row per member of a group. The member''s session connection holds pg_advisory_lock(groups.lock_key, slot) for as long as the row lives.';
COMMENT ON COLUMN shardlease.leases.group_name IS 'The group this lease belongs to.';
COMMENT ON COLUMN shardlease.leases.member_id IS 'The member''s id, unique in its group (for the worker: the pod name).';
COMMENT ON COLUMN shardlease.leases.slot IS 'The member''s slot, kept for life. Keys hash onto slots.';
COMMENT ON COLUMN shardlease.leases.incarnation IS 'New on every join: a member that rejoins gets a new incarnation.';
COMMENT ON COLUMN shardlease.leases.backend_pid IS 'pid of the member''s session backend, the one holding the advisory lock.';
COMMENT ON COLUMN shardlease.leases.ttl IS 'Lease time-to-live: each renewal sets expires_at to the database clock plus ttl.';
COMMENT ON COLUMN shardlease.leases.joined_at IS 'When this incarnation joined (database clock).';
COMMENT ON COLUMN shardlease.leases.renewed_at IS 'Last renewal (database clock).';
COMMENT ON COLUMN shardlease.leases.expires_at IS 'The lease is dead after this instant of the database clock, renewed or not.';
COMMENT ON COLUMN shardlease.leases.metadata IS 'Free-form member metadata given at join (version, host, ...).';

-- The advisory lock that proves a lease's member alive: held, granted, by the recorded backend.
CREATE FUNCTION shardlease.lock_held(p_lock_key integer, p_slot integer, p_pid integer)
RETURNS boolean LANGUAGE sql STABLE AS $$
  SELECT EXISTS (
    SELECT 1 FROM pg_locks k
    WHERE k.locktype = 'advisory'
      AND k.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND k.classid = p_lock_key::oid AND k.objid = p_slot::oid AND k.objsubid = 2
      AND k.pid = p_pid AND k.granted AND k.mode = 'ExclusiveLock')
$$;
COMMENT ON FUNCTION shardlease.lock_held(integer, integer, integer) IS
  'True when backend p_pid holds the session advisory lock (p_lock_key, p_slot): the member is connected.';

-- Membership changes announce themselves on channel "shardlease" with {"group","generation","kind"}.
CREATE FUNCTION shardlease.notify_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM pg_notify('shardlease', json_build_object(
    'group', NEW.name,
    'generation', NEW.generation,
    'kind', coalesce(nullif(current_setting('shardlease.change_kind', true), ''), 'change'))::text);
  RETURN NULL;
END
$$;
COMMENT ON FUNCTION shardlease.notify_change() IS
  'Trigger: NOTIFY shardlease with {"group","generation","kind"} whenever a group''s generation changes.';

CREATE TRIGGER notify_change AFTER UPDATE OF generation ON shardlease.groups
  FOR EACH ROW WHEN (NEW.generation IS DISTINCT FROM OLD.generation)
  EXECUTE FUNCTION shardlease.notify_change();

-- Bump the generation of a group whose row the caller holds FOR UPDATE.
CREATE FUNCTION shardlease.bump(p_group text, p_slot_count integer, p_kind text)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  v_generation bigint;
BEGIN
  PERFORM set_config('shardlease.change_kind', p_kind, true);
  UPDATE shardlease.groups
     SET generation = generation + 1, slot_count = p_slot_count, changed_at = clock_timestamp()
   WHERE name = p_group
  RETURNING generation INTO v_generation;
  RETURN v_generation;
END
$$;
COMMENT ON FUNCTION shardlease.bump(text, integer, text) IS
  'Internal: bump a group''s generation and set its slot count; the caller holds the group row FOR UPDATE.';

-- Slot count after departures: shrinks by exactly one each time the top slot departs,
-- departures applied in descending slot order.
CREATE FUNCTION shardlease.slot_count_after(p_slot_count integer, p_departed integer[])
RETURNS integer LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
  v_s integer := p_slot_count;
  v_slot integer;
BEGIN
  FOR v_slot IN SELECT d FROM unnest(p_departed) AS d ORDER BY d DESC LOOP
    IF v_slot = v_s - 1 THEN
      v_s := v_s - 1;
    END IF;
  END LOOP;
  RETURN v_s;
END
$$;
COMMENT ON FUNCTION shardlease.slot_count_after(integer, integer[]) IS
  'S after the given slots depart: S shrinks by exactly one whenever the top slot departs (in descending order).';

-- End the backends of expired leases, and only backends proven to be theirs: the session
-- backend that holds the lease's advisory lock, and backends inside a fenced transaction of
-- that slot (they hold the shared transaction lock (lock_key, 2^30 + slot)).
CREATE FUNCTION shardlease.terminate_expired(p_group text)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
  v_count integer := 0;
  v_pid integer;
BEGIN
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
      IF pg_terminate_backend(v_pid, 2000) THEN
        v_count := v_count + 1;
      END IF;
    EXCEPTION WHEN OTHERS THEN
      RAISE WARNING 'shardlease: could not terminate backend % of an expired lease: %', v_pid, SQLERRM;
    END;
  END LOOP;
  RETURN v_count;
END
$$;
COMMENT ON FUNCTION shardlease.terminate_expired(text) IS
  'End the backends of the group''s expired leases that are proven theirs (holding the lease''s advisory locks). Returns how many.';

-- Is there anything to reap? Lock-free, cheap: members poll it.
CREATE FUNCTION shardlease.needs_reap(p_group text)
RETURNS boolean LANGUAGE sql STABLE AS $$
  SELECT EXISTS (
    SELECT 1 FROM shardlease.leases l JOIN shardlease.groups g ON g.name = l.group_name
     WHERE l.group_name = p_group
       AND (l.expires_at <= clock_timestamp()
            OR NOT shardlease.lock_held(g.lock_key, l.slot, l.backend_pid)))
$$;
COMMENT ON FUNCTION shardlease.needs_reap(text) IS
  'True when the group has a lease that is expired or whose member''s advisory lock is gone.';

-- Reap, with the group row already locked FOR UPDATE. Returns the reaped leases.
CREATE FUNCTION shardlease.reap_locked(p_group text, p_lock_key integer, p_slot_count integer)
RETURNS TABLE (member_id text, slot integer, incarnation bigint, reason text, generation bigint)
LANGUAGE plpgsql AS $$
DECLARE
  v_members text[];
  v_slots integer[];
  v_incarnations bigint[];
  v_reasons text[];
  v_generation bigint;
BEGIN
  WITH dead AS (
    DELETE FROM shardlease.leases l
     WHERE l.group_name = p_group
       AND (l.expires_at <= clock_timestamp()
            OR NOT shardlease.lock_held(p_lock_key, l.slot, l.backend_pid))
    RETURNING l.member_id, l.slot, l.incarnation,
              CASE WHEN l.expires_at <= clock_timestamp() THEN 'expired' ELSE 'disconnected' END AS reason)
  SELECT array_agg(d.member_id), array_agg(d.slot), array_agg(d.incarnation), array_agg(d.reason)
    INTO v_members, v_slots, v_incarnations, v_reasons
    FROM dead d;
  IF v_slots IS NULL THEN
    RETURN;
  END IF;
  v_generation := shardlease.bump(p_group, shardlease.slot_count_after(p_slot_count, v_slots), 'reap');
  RETURN QUERY
    SELECT u.m, u.s, u.i, u.r, v_generation
      FROM unnest(v_members, v_slots, v_incarnations, v_reasons) AS u(m, s, i, r);
END
$$;
COMMENT ON FUNCTION shardlease.reap_locked(text, integer, integer) IS
  'Internal: delete the group''s dead leases, shrink S and bump the generation; the caller holds the group row FOR UPDATE.';

CREATE FUNCTION shardlease.reap(p_group text)
RETURNS TABLE (member_id text, slot integer, incarnation bigint, reason text, generation bigint)
LANGUAGE plpgsql AS $$
DECLARE
  g shardlease.groups;
BEGIN
  PERFORM shardlease.terminate_expired(p_group);
  SELECT * INTO g FROM shardlease.groups WHERE name = p_group FOR UPDATE;
  IF NOT FOUND THEN
    RETURN;
  END IF;
  RETURN QUERY SELECT * FROM shardlease.reap_locked(p_group, g.lock_key, g.slot_count);
END
$$;
COMMENT ON FUNCTION shardlease.reap(text) IS
  'Reap the group''s dead members (expired leases, or members whose advisory lock is gone) in one transaction: end their proven backends, delete their leases, shrink S, bump the generation, notify. Returns the reaped leases.';

CREATE FUNCTION shardlease.join(p_group text, p_member text, p_ttl interval,
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
  PERFORM shardlease.terminate_expired(p_group);
  INSERT INTO shardlease.groups (name, protocol_version) VALUES (p_group, p_protocol)
    ON CONFLICT (name) DO NOTHING;
  SELECT * INTO g FROM shardlease.groups WHERE name = p_group FOR UPDATE;
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
      v_slot, p_group USING ERRCODE = 'SLL01';
  END IF;

  v_incarnation := nextval('shardlease.incarnation_seq');
  v_expires := clock_timestamp() + p_ttl;
  INSERT INTO shardlease.leases (group_name, member_id, slot, incarnation, backend_pid, ttl, expires_at, metadata)
  VALUES (p_group, p_member, v_slot, v_incarnation, pg_backend_pid(), p_ttl, v_expires, coalesce(p_metadata, '{}'));
  v_generation := shardlease.bump(p_group, v_slot_count, 'join');
  PERFORM set_config('application_name',
    left(format('shardlease#%s %s/%s', v_incarnation, p_group, p_member), 63), false);
  RETURN QUERY SELECT v_slot, v_incarnation, v_generation, v_slot_count, g.lock_key, v_expires;
END
$$;
COMMENT ON FUNCTION shardlease.join(text, text, interval, jsonb, integer) IS
  'Join a group in one transaction: lock the group row, reap the dead, take the lowest vacant slot (or slot S, S grows), take the session advisory lock, insert the lease, bump the generation, notify. Call it on the member''s dedicated session connection.';

CREATE FUNCTION shardlease.renew(p_incarnation bigint)
RETURNS TABLE (expires_at timestamptz, generation bigint)
LANGUAGE sql AS $$
  UPDATE shardlease.leases l
     SET renewed_at = clock_timestamp(), expires_at = clock_timestamp() + l.ttl
    FROM shardlease.groups g
   WHERE l.incarnation = p_incarnation AND g.name = l.group_name
     AND l.expires_at > clock_timestamp() AND l.backend_pid = pg_backend_pid()
  RETURNING l.expires_at, g.generation
$$;
COMMENT ON FUNCTION shardlease.renew(bigint) IS
  'Heartbeat: extend a live lease by its ttl on the database clock. No row back means the lease is lost (expired, reaped or held by another backend).';

CREATE FUNCTION shardlease.leave(p_incarnation bigint)
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
  RETURN shardlease.bump(l.group_name, shardlease.slot_count_after(g.slot_count, ARRAY[l.slot]), 'leave');
END
$$;
COMMENT ON FUNCTION shardlease.leave(bigint) IS
  'Leave gracefully in one transaction: delete the lease, shrink S if it was the top slot, bump the generation, notify. Returns the new generation, or NULL when the lease was already gone. The caller then releases its advisory lock.';

-- The fence: first statement of every fenced transaction.
CREATE FUNCTION shardlease.fence(p_group text, p_incarnation bigint, p_generation bigint,
                                 p_timeout_ms integer)
RETURNS TABLE (status text, current_generation bigint)
LANGUAGE plpgsql AS $$
DECLARE
  g shardlease.groups;
  l shardlease.leases;
BEGIN
  -- Bound this transaction: its FOR SHARE lock must never stall a membership change for long.
  PERFORM set_config('lock_timeout', p_timeout_ms || 'ms', true);
  PERFORM set_config('statement_timeout', p_timeout_ms || 'ms', true);
  PERFORM set_config('idle_in_transaction_session_timeout', p_timeout_ms || 'ms', true);
  SELECT * INTO g FROM shardlease.groups WHERE name = p_group FOR SHARE;
  IF NOT FOUND THEN
    RETURN QUERY SELECT 'no_group'::text, NULL::bigint;
    RETURN;
  END IF;
  IF g.generation <> p_generation THEN
    RETURN QUERY SELECT 'stale_generation'::text, g.generation;
    RETURN;
  END IF;
  SELECT * INTO l FROM shardlease.leases
   WHERE group_name = p_group AND incarnation = p_incarnation;
  IF NOT FOUND THEN
    RETURN QUERY SELECT 'lease_gone'::text, g.generation;
    RETURN;
  END IF;
  IF l.expires_at <= clock_timestamp() THEN
    RETURN QUERY SELECT 'lease_expired'::text, g.generation;
    RETURN;
  END IF;
  PERFORM pg_advisory_xact_lock_shared(g.lock_key, 1073741824 + l.slot);
  RETURN QUERY SELECT 'ok'::text, g.generation;
END
$$;
COMMENT ON FUNCTION shardlease.fence(text, bigint, bigint, integer) IS
  'Fence check, run first in a fenced transaction: bound the transaction''s lock, statement and idle times, lock the group row FOR SHARE, check the generation and that the lease is live. Status ok, stale_generation, lease_gone, lease_expired or no_group.';

-- Stable key hashes, the SQL twins of shardlease::hash (test vectors prove they agree).
CREATE FUNCTION shardlease.uuid_key(p_id uuid) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
  SELECT ('x' || encode(substr(sha256(uuid_send(p_id)), 1, 8), 'hex'))::bit(64)::bigint
$$;
COMMENT ON FUNCTION shardlease.uuid_key(uuid) IS
  'Stable 64-bit key of a uuid: the first 8 bytes, big-endian, of SHA-256 over its 16 bytes (as a signed bigint). Same as shardlease::hash::uuid_key.';

CREATE FUNCTION shardlease.str_key(p_s text) RETURNS bigint
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
  SELECT ('x' || encode(substr(sha256(convert_to(p_s, 'UTF8')), 1, 8), 'hex'))::bit(64)::bigint
$$;
COMMENT ON FUNCTION shardlease.str_key(text) IS
  'Stable 64-bit key of a string: the first 8 bytes, big-endian, of SHA-256 over its UTF-8 bytes (as a signed bigint). Same as shardlease::hash::str_key.';

CREATE FUNCTION shardlease.shard_of(p_id uuid) RETURNS integer
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
  SELECT (shardlease.uuid_key(p_id) & 1023)::integer
$$;
COMMENT ON FUNCTION shardlease.shard_of(uuid) IS
  'Virtual shard (0..1023) of a uuid: the low 10 bits of uuid_key. Same as shardlease::hash::shard_of_uuid.';

-- psql views: who is in the group, which slot, alive or not, lease expires in.
CREATE VIEW shardlease.members AS
SELECT l.group_name,
       l.member_id,
       l.slot,
       l.incarnation,
       (l.expires_at > clock_timestamp() AND shardlease.lock_held(g.lock_key, l.slot, l.backend_pid)) AS alive,
       shardlease.lock_held(g.lock_key, l.slot, l.backend_pid) AS connected,
       date_trunc('milliseconds', l.expires_at - clock_timestamp()) AS expires_in,
       l.joined_at,
       l.renewed_at,
       l.expires_at,
       l.backend_pid,
       g.generation,
       g.slot_count,
       l.metadata
  FROM shardlease.leases l
  JOIN shardlease.groups g ON g.name = l.group_name;
COMMENT ON VIEW shardlease.members IS
  'Who is in each group: slot, alive (lease unexpired and advisory lock held), connected (lock held), lease expires in, and the group''s generation and slot count.';
COMMENT ON COLUMN shardlease.members.group_name IS 'The group.';
COMMENT ON COLUMN shardlease.members.member_id IS 'The member''s id (pod name).';
COMMENT ON COLUMN shardlease.members.slot IS 'The member''s slot.';
COMMENT ON COLUMN shardlease.members.incarnation IS 'The lease''s incarnation.';
COMMENT ON COLUMN shardlease.members.alive IS 'Lease unexpired by the database clock and advisory lock held by its backend.';
COMMENT ON COLUMN shardlease.members.connected IS 'The member''s session backend holds its advisory lock.';
COMMENT ON COLUMN shardlease.members.expires_in IS 'Time left on the lease by the database clock (negative: expired).';
COMMENT ON COLUMN shardlease.members.joined_at IS 'When this incarnation joined.';
COMMENT ON COLUMN shardlease.members.renewed_at IS 'Last heartbeat.';
COMMENT ON COLUMN shardlease.members.expires_at IS 'Lease expiry (database clock).';
COMMENT ON COLUMN shardlease.members.backend_pid IS 'pid of the member''s session backend (see pg_stat_activity).';
COMMENT ON COLUMN shardlease.members.generation IS 'The group''s current generation.';
COMMENT ON COLUMN shardlease.members.slot_count IS 'The group''s slot count S.';
COMMENT ON COLUMN shardlease.members.metadata IS 'Member metadata given at join.';

CREATE VIEW shardlease.group_status AS
SELECT g.name AS group_name,
       g.generation,
       g.slot_count,
       g.protocol_version,
       count(m.member_id) AS members,
       count(m.member_id) FILTER (WHERE m.alive) AS alive_members,
       g.slot_count - count(m.member_id) AS vacant_slots,
       g.changed_at
  FROM shardlease.groups g
  LEFT JOIN shardlease.members m ON m.group_name = g.name
 GROUP BY g.name, g.generation, g.slot_count, g.protocol_version, g.changed_at;
COMMENT ON VIEW shardlease.group_status IS 'One line per group: generation, slot count, members, alive members, vacant slots.';
COMMENT ON COLUMN shardlease.group_status.group_name IS 'The group.';
COMMENT ON COLUMN shardlease.group_status.generation IS 'Current generation.';
COMMENT ON COLUMN shardlease.group_status.slot_count IS 'Slot count S.';
COMMENT ON COLUMN shardlease.group_status.protocol_version IS 'Assignment protocol version.';
COMMENT ON COLUMN shardlease.group_status.members IS 'Leases in the group.';
COMMENT ON COLUMN shardlease.group_status.alive_members IS 'Leases whose member is alive.';
COMMENT ON COLUMN shardlease.group_status.vacant_slots IS 'Slots below S without a member.';
COMMENT ON COLUMN shardlease.group_status.changed_at IS 'When the generation last changed.';
