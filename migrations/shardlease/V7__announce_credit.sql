-- shardlease V7: a join is announced at once unless joins are coming in a burst.
--
-- Until V6 a join was announced at once only when the group's last announcement, of any
-- kind, was at least announce_gap old (up to 250 ms); otherwise it waited for the checkers
-- to flush it. That gap is what keeps a cold start or a rejoin storm from waking every
-- member once per join. But it also held back a lone join: one that came within 250 ms of a
-- departure, or of another lone join, reached the other members only when the gap ran out,
-- and meanwhile their fenced work was refused (the generation had moved on) while they
-- waited for a view they could not have yet. At 1,000 members a join took 260 ms to reach
-- every member when it followed a leave, against 30 to 50 ms for the NOTIFY itself.
--
-- Now join announcements draw on a credit, a token bucket per group: it holds at most
-- announce_burst() announcements and refills by one every announce_gap. A join whose
-- announcement finds a whole credit is announced at once, and takes it; otherwise it is
-- queued, as before, and the checkers flush it once the gap has passed. So a burst of joins
-- still wakes a group of S members at most announce_burst() times, and then at most once per
-- gap (4 times a second at S >= 250), while joins that come one at a time are announced at
-- once. Departures are announced at once, as before, and take no credit. The burst is small
-- (2) on purpose: a restart storm, where 100 members come back beside 900 that must keep
-- renewing, may send only that many announcements more than V6 did.

-- The most join announcements a group sends back to back before the rest wait for the gap.
CREATE FUNCTION shardlease.announce_burst() RETURNS float8
LANGUAGE sql IMMUTABLE AS $$ SELECT 2::float8 $$;
COMMENT ON FUNCTION shardlease.announce_burst() IS
  'The size of a group''s join-announcement credit (2): joins that come in a burst are announced at once up to this many, then at most once per announce_gap.';
REVOKE EXECUTE ON FUNCTION shardlease.announce_burst() FROM PUBLIC;

ALTER TABLE shardlease.groups
  ADD COLUMN announce_credit float8 NOT NULL DEFAULT shardlease.announce_burst(),
  ADD COLUMN announce_credit_at timestamptz NOT NULL DEFAULT now();
COMMENT ON COLUMN shardlease.groups.announce_credit IS
  'Join announcements that may go out at once, as of announce_credit_at (a token bucket: at most announce_burst(), refilled by one every announce_gap; see bump).';
COMMENT ON COLUMN shardlease.groups.announce_credit_at IS
  'When announce_credit was last brought up to date (database clock).';

-- The credit of a group of p_slot_count slots at p_now: what it held at p_at, plus one per
-- announce_gap since, at most announce_burst().
CREATE FUNCTION shardlease.announce_credit(p_credit float8, p_at timestamptz, p_slot_count integer,
                                           p_now timestamptz)
RETURNS float8 LANGUAGE sql IMMUTABLE AS $$
  SELECT least(shardlease.announce_burst(),
               p_credit + extract(epoch FROM p_now - p_at)::float8
                          / greatest(extract(epoch FROM shardlease.announce_gap(p_slot_count))::float8, 1e-6))
$$;
COMMENT ON FUNCTION shardlease.announce_credit(float8, timestamptz, integer, timestamptz) IS
  'Internal: a join-announcement credit that held p_credit at p_at, refilled by one per announce_gap of a group of p_slot_count slots until p_now, at most announce_burst().';
REVOKE EXECUTE ON FUNCTION shardlease.announce_credit(float8, timestamptz, integer, timestamptz) FROM PUBLIC;

-- Bump the generation of a group whose row the caller holds FOR UPDATE, and queue p_delta
-- for announcement: at once for a departure, and for a join that finds a whole credit.
CREATE OR REPLACE FUNCTION shardlease.bump(p_group text, p_slot_count integer, p_kind text, p_delta jsonb)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
  v_generation bigint;
  v_lock_key integer;
  v_credit float8;
BEGIN
  SELECT g.lock_key INTO v_lock_key FROM shardlease.groups g WHERE g.name = p_group;
  -- Fenced transactions hold (lock_key, -1) shared while they commit: wait for those, and
  -- keep new ones out until this change has committed.
  PERFORM pg_advisory_xact_lock(v_lock_key, -1);
  PERFORM set_config('shardlease.in_change', 'on', true);
  UPDATE shardlease.groups g
     SET generation = g.generation + 1, slot_count = p_slot_count, changed_at = clock_timestamp(),
         unannounced = g.unannounced || jsonb_build_array(p_delta || jsonb_build_object('s', p_slot_count)),
         -- The credit at the group's new size, brought up to now (announce takes from it).
         announce_credit = shardlease.announce_credit(g.announce_credit, g.announce_credit_at,
                                                      p_slot_count, clock_timestamp()),
         announce_credit_at = clock_timestamp()
   WHERE g.name = p_group
  RETURNING g.generation, g.announce_credit INTO v_generation, v_credit;
  PERFORM set_config('shardlease.in_change', '', true);
  IF p_kind <> 'join' OR v_credit >= 1 THEN
    PERFORM shardlease.announce(p_group, p_kind);
  END IF;
  RETURN v_generation;
END
$$;
COMMENT ON FUNCTION shardlease.bump(text, integer, text, jsonb) IS
  'Internal: bump a group''s generation and set its slot count, queue the change p_delta and announce: departures at once, joins at once while the group''s announcement credit lasts (announce_burst, refilled once per announce_gap), else within announce_gap by the checkers; waits for fenced transactions that are committing. The caller holds the group row FOR UPDATE.';

-- NOTIFY the group's unannounced changes and mark them announced; a join announcement takes
-- one from the credit. The caller holds the group row locked (FOR UPDATE).
CREATE OR REPLACE FUNCTION shardlease.announce(p_group text, p_kind text) RETURNS void
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
  UPDATE shardlease.groups gr
     SET announced_generation = gr.generation, announced_at = clock_timestamp(), unannounced = '[]',
         announce_credit = CASE WHEN p_kind = 'join'
                                THEN greatest(0, shardlease.announce_credit(gr.announce_credit, gr.announce_credit_at,
                                                                            gr.slot_count, clock_timestamp()) - 1)
                                ELSE gr.announce_credit END,
         announce_credit_at = CASE WHEN p_kind = 'join' THEN clock_timestamp() ELSE gr.announce_credit_at END
   WHERE gr.name = p_group;
END
$$;
COMMENT ON FUNCTION shardlease.announce(text, text) IS
  'Internal: NOTIFY shardlease with {"group","generation","kind","prev","slot_count","deltas"}: the changes since generation prev (one delta per generation; several notifications when they do not fit in one), or a hint {"group","generation","kind"} when a change carries no detail; then mark them announced. A join announcement takes one from the group''s credit. The caller holds the group row FOR UPDATE.';
