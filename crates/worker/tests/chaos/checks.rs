//! The soak's tables (the lease audit, the faults, the inserted and deleted items) and the
//! checks over them and over `install_audit`'s table. The checks run in SQL, so that a long
//! soak's millions of increments are never loaded into the test; each prints its figures
//! and records its violations.

use shardlease::tokio_postgres::{Client, Row};

use crate::common::TICK;
use crate::soak::Record;
use crate::GAP_BOUND;

/// The lease audit (a trigger on `shardlease.leases`: a delete, or a change of incarnation
/// or member, ends a lease; an insert starts one) and the soak's own tables.
pub async fn install_chaos_tables(c: &Client) {
    c.batch_execute(
        "CREATE TABLE public.test_lease_audit (
           seq bigserial PRIMARY KEY,
           event text NOT NULL CHECK (event IN ('join', 'end')),
           group_name text NOT NULL,
           member_id text NOT NULL,
           slot integer NOT NULL,
           incarnation bigint NOT NULL,
           at timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE FUNCTION public.test_lease_audit_fn() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF TG_OP IN ('UPDATE', 'DELETE') THEN
             INSERT INTO public.test_lease_audit (event, group_name, member_id, slot, incarnation)
             VALUES ('end', OLD.group_name, OLD.member_id, OLD.slot, OLD.incarnation);
           END IF;
           IF TG_OP IN ('UPDATE', 'INSERT') THEN
             INSERT INTO public.test_lease_audit (event, group_name, member_id, slot, incarnation)
             VALUES ('join', NEW.group_name, NEW.member_id, NEW.slot, NEW.incarnation);
           END IF;
           RETURN NULL;
         END $$;
         CREATE TRIGGER test_lease_audit AFTER INSERT OR DELETE ON shardlease.leases
           FOR EACH ROW EXECUTE FUNCTION public.test_lease_audit_fn();
         -- A lease row that changes hands (another incarnation or member) ends one lease
         -- and starts another; heartbeats only move expires_at.
         CREATE TRIGGER test_lease_audit_handover AFTER UPDATE ON shardlease.leases
           FOR EACH ROW WHEN (OLD.incarnation IS DISTINCT FROM NEW.incarnation
                              OR OLD.member_id IS DISTINCT FROM NEW.member_id)
           EXECUTE FUNCTION public.test_lease_audit_fn();
         CREATE TABLE public.chaos_faults (
           seq serial PRIMARY KEY,
           kind text NOT NULL,
           target text NOT NULL,
           detail text NOT NULL,
           excuses boolean NOT NULL,
           span tstzrange NOT NULL);
         CREATE INDEX ON public.chaos_faults USING gist (span);
         CREATE TABLE public.chaos_inserted (id uuid PRIMARY KEY, at timestamptz NOT NULL);
         CREATE TABLE public.chaos_deleted (id uuid PRIMARY KEY, value integer NOT NULL, at timestamptz NOT NULL);",
    )
    .await
    .expect("install the lease audit and the soak's tables");
}

/// Every check on the audit tables, in turn.
pub async fn check_audit_tables(c: &Client, rec: &mut Record) {
    check_single_writer(c, rec).await;
    check_lease_ends(c, rec).await;
    check_values(c, rec).await;
    check_cadence(c, rec).await;
}

/// One query's single row of figures.
pub async fn figures(c: &Client, what: &str, sql: &str) -> Row {
    c.query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:?}"))
}

/// Up to 5 example rows of `sql`, each as text.
async fn examples(c: &Client, sql: &str) -> Vec<String> {
    c.query(&format!("SELECT x::text FROM ({sql}) x LIMIT 5"), &[])
        .await
        .unwrap_or_else(|e| panic!("examples of {sql}: {e:?}"))
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// I1: at most one writer per item and generation, and every writer held a lease.
async fn check_single_writer(c: &Client, rec: &mut Record) {
    let row = figures(
        c,
        "single writer",
        "SELECT count(*), count(*) FILTER (WHERE writers > 1 OR incarnations > 1), \
                coalesce(sum(n), 0)::bigint \
           FROM (SELECT id, generation, count(DISTINCT worker) AS writers, \
                        count(DISTINCT incarnation) AS incarnations, count(*) AS n \
                   FROM public.test_audit GROUP BY id, generation) x",
    )
    .await;
    let (pairs, shared, increments): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
    let leaseless: i64 = figures(
        c,
        "writes without a lease",
        "SELECT count(*) FROM public.test_audit WHERE incarnation IS NULL",
    )
    .await
    .get(0);
    println!(
        "chaos: single writer: {increments} increments over {pairs} (item, generation) pairs; {shared} pairs with more than one writer; {leaseless} increments by a writer without a lease"
    );
    if shared > 0 {
        let ex = examples(
            c,
            "SELECT id, generation, array_agg(DISTINCT worker) AS writers, array_agg(DISTINCT incarnation) AS incarnations \
               FROM public.test_audit GROUP BY id, generation \
              HAVING count(DISTINCT worker) > 1 OR count(DISTINCT incarnation) > 1",
        )
        .await;
        rec.fail(format!(
            "{shared} (item, generation) pairs had more than one writer, e.g. {ex:?}"
        ));
    }
    if leaseless > 0 {
        let ex = examples(
            c,
            "SELECT id, value, worker, generation, at FROM public.test_audit WHERE incarnation IS NULL ORDER BY seq",
        )
        .await;
        rec.fail(format!(
            "{leaseless} increments committed by a writer that held no lease, e.g. {ex:?}"
        ));
    }
}

/// No write commits after its writer's lease ended (commit timestamps), and every audited
/// transaction has a commit timestamp (else the comparison could not see it).
async fn check_lease_ends(c: &Client, rec: &mut Record) {
    let unknown: i64 = figures(
        c,
        "commit timestamps",
        "SELECT (SELECT count(*) FROM public.test_audit WHERE pg_xact_commit_timestamp(xmin) IS NULL) \
              + (SELECT count(*) FROM public.test_lease_audit WHERE pg_xact_commit_timestamp(xmin) IS NULL)",
    )
    .await
    .get(0);
    let late_sql = "WITH ends AS (
                      SELECT incarnation, min(member_id) AS member_id,
                             min(pg_xact_commit_timestamp(xmin)) AS ended
                        FROM public.test_lease_audit WHERE event = 'end' GROUP BY incarnation),
                    writes AS (
                      SELECT incarnation, max(pg_xact_commit_timestamp(xmin)) AS last_write
                        FROM public.test_audit WHERE incarnation IS NOT NULL GROUP BY incarnation)
                    SELECT e.member_id, e.incarnation, w.last_write, e.ended,
                           extract(epoch FROM e.ended - w.last_write)::float8 AS margin
                      FROM ends e JOIN writes w USING (incarnation)";
    let row = figures(
        c,
        "writes after their lease ended",
        &format!(
            "SELECT (SELECT count(*) FROM public.test_lease_audit WHERE event = 'end'), count(*), \
                    count(*) FILTER (WHERE margin < 0), min(margin) FROM ({late_sql}) x"
        ),
    )
    .await;
    let (ends, ended_writers, late, closest): (i64, i64, i64, Option<f64>) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    println!(
        "chaos: lease ends: {ends} audited, {ended_writers} of them by writers; {late} writers committed a write after their lease ended; closest: last write {} before its lease ended; {unknown} commit timestamps unknown",
        closest
            .map(|m| format!("{:.0} ms", m * 1e3))
            .unwrap_or_else(|| "-".into())
    );
    if late > 0 {
        let ex = examples(c, &format!("SELECT * FROM ({late_sql}) y WHERE margin < 0")).await;
        rec.fail(format!(
            "{late} writers committed a write after their lease's end committed, e.g. {ex:?}"
        ));
    }
    if unknown > 0 {
        rec.fail(format!(
            "{unknown} audited transactions have no commit timestamp: the lease-end check cannot see them"
        ));
    }
}

/// Every item's value (a deleted one's at deletion) equals its audited increments, 1, 2, 3...
async fn check_values(c: &Client, rec: &mut Record) {
    let values_sql = "WITH items AS (
                        SELECT id, value, false AS deleted FROM public.work_items
                        UNION ALL SELECT id, value, true FROM public.chaos_deleted),
                      a AS (
                        SELECT id, count(*) AS n, max(value) AS top, count(DISTINCT value) AS distinct_values
                          FROM public.test_audit GROUP BY id)
                      SELECT i.id, i.deleted, i.value, coalesce(a.n, 0) AS audited,
                             coalesce(a.top, 0) AS top, coalesce(a.distinct_values, 0) AS distinct_values
                        FROM items i LEFT JOIN a USING (id)";
    let row = figures(
        c,
        "values",
        &format!(
            "SELECT count(*), count(*) FILTER (WHERE deleted), \
                    count(*) FILTER (WHERE value <> audited OR top <> audited OR distinct_values <> audited), \
                    (SELECT count(*) FROM public.chaos_inserted) \
               FROM ({values_sql}) x"
        ),
    )
    .await;
    let (items, deleted, wrong, inserted): (i64, i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    println!(
        "chaos: values: {items} items ({inserted} inserted, {deleted} deleted during the soak); {wrong} whose value differs from its audited increments"
    );
    if wrong > 0 {
        let ex = examples(
            c,
            &format!(
                "SELECT * FROM ({values_sql}) y WHERE value <> audited OR top <> audited OR distinct_values <> audited"
            ),
        )
        .await;
        rec.fail(format!(
            "{wrong} items' values differ from their audited increments (lost or duplicated), e.g. {ex:?}"
        ));
    }
}

/// Outside the windows of the faults that excuse, no item waits more than [`GAP_BOUND`] (an
/// inserted item: from its insert); no two increments closer than half a tick; no inserted
/// item left unticked.
async fn check_cadence(c: &Client, rec: &mut Record) {
    let gaps_sql = "WITH iv AS (
                      SELECT id, lag(at) OVER w AS a, at AS b, lag(worker) OVER w AS from_worker,
                             worker AS to_worker
                        FROM public.test_audit WINDOW w AS (PARTITION BY id ORDER BY value)
                      UNION ALL
                      SELECT i.id, i.at, min(t.at), 'inserted', min(t.worker)
                        FROM public.chaos_inserted i JOIN public.test_audit t USING (id)
                       GROUP BY i.id, i.at)
                    SELECT iv.*, extract(epoch FROM b - a)::float8 AS gap,
                           EXISTS (SELECT 1 FROM public.chaos_faults f
                                    WHERE f.excuses AND f.span && tstzrange(iv.a, iv.b, '[]')) AS excused
                      FROM iv WHERE a IS NOT NULL";
    let row = figures(
        c,
        "cadence",
        &format!(
            "SELECT count(*), count(*) FILTER (WHERE excused), \
                    coalesce(max(gap) FILTER (WHERE NOT excused), 0), coalesce(max(gap), 0), \
                    count(*) FILTER (WHERE NOT excused AND gap > {GAP_BOUND}), \
                    coalesce(min(gap) FILTER (WHERE from_worker <> 'inserted'), 1), \
                    (SELECT count(*) FROM public.chaos_inserted i \
                      WHERE NOT EXISTS (SELECT 1 FROM public.test_audit t WHERE t.id = i.id) \
                        AND EXISTS (SELECT 1 FROM public.work_items w WHERE w.id = i.id)) \
               FROM ({gaps_sql}) x"
        ),
    )
    .await;
    let (intervals, excused, max_outside, max_all, over, min_gap, never): (
        i64,
        i64,
        f64,
        f64,
        i64,
        f64,
        i64,
    ) = (
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
        row.get(6),
    );
    println!(
        "chaos: cadence: {intervals} intervals ({excused} in fault windows); longest wait outside fault windows {max_outside:.3} s (bound {GAP_BOUND} s), {over} over; longest overall {max_all:.3} s; shortest interval {min_gap:.3} s (at least {:.3} s)",
        TICK / 2.0
    );
    if over > 0 {
        let ex = examples(
            c,
            &format!(
                "SELECT id, from_worker, to_worker, a, b, round(gap::numeric, 3) AS gap FROM ({gaps_sql}) y \
                  WHERE NOT excused AND gap > {GAP_BOUND} ORDER BY gap DESC"
            ),
        )
        .await;
        rec.fail(format!(
            "{over} waits outside fault windows exceeded {GAP_BOUND} s (longest {max_outside:.3} s), e.g. {ex:?}"
        ));
    }
    if min_gap < TICK / 2.0 - 1e-6 {
        rec.fail(format!(
            "two increments of one item were only {min_gap:.3} s apart (at least {:.3} s: the due rule)",
            TICK / 2.0
        ));
    }
    if never > 0 {
        rec.fail(format!("{never} inserted items were never incremented"));
    }
}
