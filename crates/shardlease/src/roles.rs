//! Least-privilege roles: what a member and an inspector may do in the `shardlease` schema,
//! granted by the schema owner.
//!
//! - A **member** (the role your workers connect as) may join, heartbeat, leave, reap and run
//!   fenced transactions: it calls the protocol's functions, which run with their owner's
//!   rights (SECURITY DEFINER, schema version 4), and reads the groups and leases. It writes no
//!   table of the schema itself, so it deletes no lease but its own (leave) or a dead member's
//!   (reap), and the reaper ends only backends proven to be an expired member's. It renews
//!   through the view `shardlease.own_lease` (schema version 9), which shows a session its own
//!   live lease only and lets it move the expiry no further than one TTL from now.
//! - An **inspector** (psql users, dashboards) may read the views `shardlease.members` and
//!   `shardlease.group_status`, and nothing else.
//! - Neither may create, alter or drop anything: they own nothing, and get no `CREATE`.
//!
//! Your own table's privileges are yours to grant (the worker grants `UPDATE` on
//! `public.work_items`): the fence does not need any privilege of its own on it.
//!
//! ```no_run
//! # async fn f(mut client: tokio_postgres::Client) -> shardlease::Result<()> {
//! // As the schema owner (the role that ran the migrations):
//! let tx = client.transaction().await?;
//! let granted = shardlease::roles::grant(&tx, "orders_worker", shardlease::roles::RoleKind::Member).await?;
//! tx.execute("GRANT SELECT, UPDATE ON orders TO orders_worker", &[]).await?;
//! tx.commit().await?;
//! for w in &granted.warnings {
//!     eprintln!("warning: {w}");
//! }
//! # Ok(()) }
//! ```

use std::fmt;

use tokio_postgres::Transaction;

use crate::error::{Doing, Error, Result};

/// The functions a member calls, every overload: the membership protocol and the fence.
pub const MEMBER_FUNCTIONS: &[&str] = &[
    "join",
    "heartbeat",
    "leave",
    "reap",
    "needs_reap",
    "flush_announcements",
    "fence_begin",
    "fence_guard",
    "fence_commit",
    "leader_fence_begin",
    "leader_fence_commit",
    "await_departure",
];

/// The functions a member calls with its own rights: the heartbeat's read of its lease
/// (schema version 8), inlined into the member's statement, and what that read calls.
pub const MEMBER_READS: &[&str] = &["lease_state", "timeline", "incarnation_timeline"];

/// What a member's statements call from schema version 9 on (the generation a heartbeat
/// reports), granted where the schema has it.
const MEMBER_READS_V9: &[&str] = &["reported_generation"];

/// The tables a member reads (its view of the group is read from them).
pub const MEMBER_TABLES: &[&str] = &["groups", "leases"];

/// The view a member renews its lease through (schema version 9), and the only columns it
/// may write there: its own live lease's renewal and expiry, within the lease's TTL.
pub const MEMBER_RENEWAL: &str = "SELECT, UPDATE (renewed_at, expires_at) ON shardlease.own_lease";

/// What an inspector (and a member) reads: the views for psql, and the migration history
/// (to check the schema's version).
pub const INSPECTOR_RELATIONS: &[&str] = &["members", "group_status", "leaders", "schema_history"];

/// The functions the views call, which their readers need (`shardlease.members` reads the
/// slot locks with `slot_locks`).
pub const INSPECTOR_FUNCTIONS: &[&str] = &["slot_locks", "leader_incarnation"];

/// The kind of a role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RoleKind {
    /// Runs members: may join, heartbeat, leave, reap and fence; reads what inspectors read.
    Member,
    /// Only reads the views.
    Inspector,
}

impl fmt::Display for RoleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RoleKind::Member => "member",
            RoleKind::Inspector => "inspector",
        })
    }
}

/// What [`grant`] granted, and what it found worth a warning.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Grants {
    /// The role.
    pub role: String,
    /// What it may do.
    pub kind: RoleKind,
    /// Every privilege granted, as `PRIVILEGE ON object` (`EXECUTE ON FUNCTION shardlease.join(...)`).
    pub privileges: Vec<String>,
    /// Things outside the schema that give the role more than its kind needs, or keep the
    /// owner from doing its part (each says what to run about it).
    pub warnings: Vec<String>,
}

/// Quote an SQL identifier (`"name"`, inner quotes doubled).
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Grant `role` exactly what a role of `kind` needs in the `shardlease` schema, after
/// revoking whatever else it had there; idempotent. Run it as the schema owner, inside a
/// transaction (`tx`), so that a running member never sees a privilege missing.
///
/// Fails with [`Error::Config`] when the role does not exist, is a superuser, or has the
/// owner's rights (it could then alter and drop everything), and with
/// [`Error::NotMigrated`] when the schema is older than version 4 (whose functions run
/// with their owner's rights).
pub async fn grant(tx: &Transaction<'_>, role: &str, kind: RoleKind) -> Result<Grants> {
    let warnings = check_role(tx, role, kind).await?;
    let r = quote_ident(role);
    for object in ["TABLES", "SEQUENCES", "FUNCTIONS"] {
        exec(
            tx,
            &format!("REVOKE ALL ON ALL {object} IN SCHEMA shardlease FROM {r}"),
        )
        .await?;
    }
    exec(tx, &format!("REVOKE ALL ON SCHEMA shardlease FROM {r}")).await?;

    let mut privileges = vec!["USAGE ON SCHEMA shardlease".to_owned()];
    let mut relations: Vec<&str> = INSPECTOR_RELATIONS.to_vec();
    let mut functions: Vec<&str> = INSPECTOR_FUNCTIONS.to_vec();
    if kind == RoleKind::Member {
        relations.extend_from_slice(MEMBER_TABLES);
        functions.extend_from_slice(MEMBER_FUNCTIONS);
        functions.extend_from_slice(MEMBER_READS);
    }
    for rel in relations {
        privileges.push(format!("SELECT ON shardlease.{rel}"));
    }
    for f in overloads(tx, &functions).await? {
        privileges.push(format!("EXECUTE ON FUNCTION {f}"));
    }
    if kind == RoleKind::Member && has_renewal_view(tx).await? {
        for f in overloads(tx, MEMBER_READS_V9).await? {
            privileges.push(format!("EXECUTE ON FUNCTION {f}"));
        }
        privileges.push(MEMBER_RENEWAL.to_owned());
    }
    for p in &privileges {
        exec(tx, &format!("GRANT {p} TO {r}")).await?;
    }
    Ok(Grants {
        role: role.to_owned(),
        kind,
        privileges,
        warnings,
    })
}

/// Whether the schema has `shardlease.own_lease` (version 9 and later), as the migrations'
/// baseline probe of version 9 tells.
async fn has_renewal_view(tx: &Transaction<'_>) -> Result<bool> {
    let Some(probe) = crate::migrate::LIBRARY_PROBES
        .iter()
        .find(|p| p.version == 9)
    else {
        return Ok(false);
    };
    let row = tx
        .query_one(probe.sql, &[])
        .await
        .doing(|| "looking for shardlease.own_lease".into())?;
    Ok(row.get(0))
}

async fn exec(tx: &Transaction<'_>, sql: &str) -> Result<()> {
    tx.batch_execute(sql)
        .await
        .doing(|| format!("running {sql}"))
}

/// Every overload of the named functions of the schema, as `shardlease.name(argument types)`.
/// The members' must run with their owner's rights.
async fn overloads(tx: &Transaction<'_>, names: &[&str]) -> Result<Vec<String>> {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let rows = tx
        .query(
            "SELECT p.proname, \
                    format('%I.%I(%s)', n.nspname, p.proname, oidvectortypes(p.proargtypes)), \
                    p.prosecdef \
               FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
              WHERE n.nspname = 'shardlease' AND p.proname = ANY($1) \
              ORDER BY 1, 2",
            &[&names],
        )
        .await
        .doing(|| "reading the shardlease functions".into())?;
    for name in &names {
        if !rows.iter().any(|r| r.get::<_, &str>(0) == name) {
            return Err(Error::NotMigrated {
                detail: format!("function shardlease.{name} does not exist"),
            });
        }
    }
    for row in &rows {
        let name: &str = row.get(0);
        if MEMBER_FUNCTIONS.contains(&name) && !row.get::<_, bool>(2) {
            return Err(Error::NotMigrated {
                detail: format!(
                    "{} does not run with its owner's rights (SECURITY DEFINER): the schema is older than version 4",
                    row.get::<_, &str>(1)
                ),
            });
        }
    }
    Ok(rows.iter().map(|r| r.get(1)).collect())
}

/// Refuse roles that would make the grants meaningless; warn about rights from elsewhere.
async fn check_role(tx: &Transaction<'_>, role: &str, kind: RoleKind) -> Result<Vec<String>> {
    let schema = tx
        .query_opt(
            "SELECT pg_get_userbyid(n.nspowner) FROM pg_namespace n WHERE n.nspname = 'shardlease'",
            &[],
        )
        .await
        .doing(|| "reading the shardlease schema".into())?;
    let Some(schema) = schema else {
        return Err(Error::NotMigrated {
            detail: "schema shardlease does not exist".into(),
        });
    };
    let owner: String = schema.get(0);
    let row = tx
        .query_opt(
            "SELECT r.rolsuper, \
                    pg_has_role(r.oid, n.nspowner, 'MEMBER'), \
                    has_database_privilege(r.oid, current_database(), 'CREATE'), \
                    has_schema_privilege(r.oid, 'public', 'CREATE'), \
                    o.rolsuper OR pg_has_role(o.oid, r.oid, 'USAGE') \
                      OR pg_has_role(o.oid, 'pg_signal_backend', 'USAGE'), \
                    current_database() \
               FROM pg_roles r, pg_namespace n JOIN pg_roles o ON o.oid = n.nspowner \
              WHERE r.rolname = $1 AND n.nspname = 'shardlease'",
            &[&role],
        )
        .await
        .doing(|| format!("reading role {role}"))?;
    let Some(row) = row else {
        return Err(Error::Config(format!(
            "role {role} does not exist: create it first, e.g. CREATE ROLE {} LOGIN PASSWORD '...'",
            quote_ident(role)
        )));
    };
    let (superuser, owner_rights, db_create, public_create, owner_signals, db): (
        bool,
        bool,
        bool,
        bool,
        bool,
        String,
    ) = (
        row.get(0),
        row.get(1),
        row.get(2),
        row.get(3),
        row.get(4),
        row.get(5),
    );
    if superuser {
        return Err(Error::Config(format!(
            "role {role} is a superuser: it bypasses every privilege, so a {kind} role must not be one"
        )));
    }
    if owner_rights {
        return Err(Error::Config(format!(
            "role {role} has the rights of {owner}, the owner of schema shardlease (it is {owner} or a member of it): \
             it could alter and drop everything; a {kind} role must be a role of its own"
        )));
    }
    let mut warnings = Vec::new();
    if db_create {
        warnings.push(format!(
            "role {role} may create schemas in database {db}: REVOKE CREATE ON DATABASE {} FROM {} (and from PUBLIC)",
            quote_ident(&db),
            quote_ident(role)
        ));
    }
    if public_create {
        warnings.push(format!(
            "role {role} may create objects in schema public (PostgreSQL 14 and older grant that to PUBLIC): \
             REVOKE CREATE ON SCHEMA public FROM PUBLIC"
        ));
    }
    if kind == RoleKind::Member && !owner_signals {
        warnings.push(format!(
            "the schema owner {owner} may not end the backends of {role}, so the reaper cannot end a hung \
             member's session (its lease is still reaped, and the fence refuses its writes): \
             GRANT pg_signal_backend TO {}",
            quote_ident(&owner)
        ));
    }
    Ok(warnings)
}

#[cfg(test)]
mod tests {
    use super::quote_ident;

    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(quote_ident("worker"), "\"worker\"");
        assert_eq!(quote_ident("a\"b; DROP"), "\"a\"\"b; DROP\"");
    }
}
