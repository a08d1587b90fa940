//! The SQL of a live move, against the source and target pods: preflight checks, the
//! schema copy (pg_dump | psql), logical replication objects, fencing, WAL positions,
//! sequences and cleanup. Every object podrouter makes is named `podrouter_move_<job>`, so a
//! sweep never touches anyone else's.

use crate::proxy::server::{quote_ident, quote_literal};
use sqlx::{PgConnection, Row};
use std::time::Duration;

pub type Result<T> = std::result::Result<T, sqlx::Error>;

/// Name of the publication, subscription and slot of move job `job`.
pub fn object_name(job: i64) -> String {
    format!("podrouter_move_{job}")
}

/// Name the source database is kept under after move `job` (at most 63 bytes).
pub fn kept_name(tenant: &str, job: i64) -> String {
    let suffix = format!("_moved_{job}");
    let mut head = tenant.to_owned();
    while head.len() + suffix.len() > 63 {
        head.pop();
    }
    head + &suffix
}

pub async fn exec(conn: &mut PgConnection, sql: String) -> Result<()> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(conn)
        .await?;
    Ok(())
}

// === preflight ===

/// What the source tenant database holds that a move must know about.
#[derive(Debug, Default)]
pub struct SourceFacts {
    pub wal_level: String,
    pub version: i32,
    pub free_slots: i64,
    pub free_senders: i64,
    pub large_objects: i64,
    pub unlogged: Vec<String>,
    pub prepared_xacts: i64,
    /// Tables that need REPLICA IDENTITY FULL for the move, with their own identity
    /// (`d` default without a primary key, `n` nothing).
    pub without_identity: Vec<(String, String)>,
    /// Tables and their sizes in bytes (for copy progress).
    pub tables: Vec<(String, i64)>,
    /// Roles that own objects or hold privileges in the database.
    pub roles: Vec<String>,
}

/// Reads [`SourceFacts`] over a connection to the tenant's database on the source.
pub async fn source_facts(db: &mut PgConnection) -> Result<SourceFacts> {
    let row = sqlx::query(
        "SELECT current_setting('wal_level') AS wal_level,
                current_setting('server_version_num')::int AS version,
                current_setting('max_replication_slots')::int8 - (SELECT count(*) FROM pg_replication_slots) AS free_slots,
                current_setting('max_wal_senders')::int8 - (SELECT count(*) FROM pg_stat_replication) AS free_senders,
                (SELECT count(*) FROM pg_largeobject_metadata) AS large_objects,
                (SELECT count(*) FROM pg_prepared_xacts WHERE database = current_database()) AS prepared_xacts",
    )
    .fetch_one(&mut *db)
    .await?;
    let mut facts = SourceFacts {
        wal_level: row.try_get("wal_level")?,
        version: row.try_get("version")?,
        free_slots: row.try_get("free_slots")?,
        free_senders: row.try_get("free_senders")?,
        large_objects: row.try_get("large_objects")?,
        prepared_xacts: row.try_get("prepared_xacts")?,
        ..Default::default()
    };
    const USER_TABLES: &str = "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
            AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'";
    facts.unlogged = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT format('%I.%I', n.nspname, c.relname) {USER_TABLES} AND c.relpersistence = 'u' ORDER BY 1"
    )))
    .fetch_all(&mut *db)
    .await?;
    facts.without_identity = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT format('%I.%I', n.nspname, c.relname) AS t, c.relreplident::text AS ident {USER_TABLES}
            AND c.relkind = 'r'
            AND (c.relreplident = 'n'
                 OR (c.relreplident = 'd' AND NOT EXISTS
                     (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary)))
          ORDER BY 1"
    )))
    .fetch_all(&mut *db)
    .await?
    .iter()
    .map(|r| Ok((r.try_get("t")?, r.try_get("ident")?)))
    .collect::<Result<_>>()?;
    facts.tables = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT format('%I.%I', n.nspname, c.relname) AS t, pg_table_size(c.oid) AS size {USER_TABLES}
            AND c.relkind = 'r' ORDER BY 1"
    )))
    .fetch_all(&mut *db)
    .await?
    .iter()
    .map(|r| Ok((r.try_get("t")?, r.try_get("size")?)))
    .collect::<Result<_>>()?;
    facts.roles = sqlx::query_scalar(
        "SELECT DISTINCT rolname FROM pg_roles r WHERE r.oid IN (
             SELECT datdba FROM pg_database WHERE datname = current_database()
             UNION SELECT nspowner FROM pg_namespace WHERE nspname NOT LIKE 'pg_%' AND nspname <> 'information_schema'
             UNION SELECT relowner FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE n.nspname NOT LIKE 'pg_%' AND n.nspname <> 'information_schema'
             UNION SELECT (aclexplode(datacl)).grantee FROM pg_database WHERE datname = current_database()
             UNION SELECT (aclexplode(relacl)).grantee FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                    WHERE n.nspname NOT LIKE 'pg_%' AND n.nspname <> 'information_schema')
         ORDER BY 1",
    )
    .fetch_all(&mut *db)
    .await?;
    Ok(facts)
}

/// What the target pod offers for a move.
#[derive(Debug)]
pub struct TargetFacts {
    pub version: i32,
    pub has_database: bool,
    pub missing_roles: Vec<String>,
    pub free_workers: i64,
}

pub async fn target_facts(
    conn: &mut PgConnection,
    tenant: &str,
    roles: &[String],
) -> Result<TargetFacts> {
    let row = sqlx::query(
        "SELECT current_setting('server_version_num')::int AS version,
                EXISTS (SELECT 1 FROM pg_database WHERE datname = $1) AS has_database,
                coalesce((SELECT array_agg(r ORDER BY r) FROM unnest($2::text[]) r
                           WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r)), '{}') AS missing,
                current_setting('max_logical_replication_workers')::int8
                  - (SELECT count(*) FROM pg_stat_subscription) AS free_workers",
    )
    .bind(tenant)
    .bind(roles)
    .fetch_one(conn)
    .await?;
    Ok(TargetFacts {
        version: row.try_get("version")?,
        has_database: row.try_get("has_database")?,
        missing_roles: row.try_get("missing")?,
        free_workers: row.try_get("free_workers")?,
    })
}

// === replication ===

pub async fn set_identity(db: &mut PgConnection, table: &str, ident: &str) -> Result<()> {
    let what = match ident {
        "n" => "NOTHING",
        "f" => "FULL",
        _ => "DEFAULT",
    };
    // `table` comes from format('%I.%I') on the server: already quoted.
    exec(db, format!("ALTER TABLE {table} REPLICA IDENTITY {what}")).await
}

pub async fn create_publication(db: &mut PgConnection, name: &str) -> Result<()> {
    exec(
        db,
        format!("CREATE PUBLICATION {} FOR ALL TABLES", quote_ident(name)),
    )
    .await
}

pub async fn drop_publication(db: &mut PgConnection, name: &str) -> Result<()> {
    exec(
        db,
        format!("DROP PUBLICATION IF EXISTS {}", quote_ident(name)),
    )
    .await
}

/// Creates the subscription on the target's tenant database; its slot (same name) is made
/// on the source, and the initial copy starts at once. Its apply worker commits
/// synchronously, so it confirms each source transaction as soon as it is applied: with
/// the subscription default (`off`) the confirmation waits for the target's WAL writer, and
/// that wait would sit inside the cutover pause.
pub async fn create_subscription(db: &mut PgConnection, name: &str, conninfo: &str) -> Result<()> {
    exec(
        db,
        format!(
            "CREATE SUBSCRIPTION {n} CONNECTION {c} PUBLICATION {n} WITH (copy_data = true, slot_name = {s}, synchronous_commit = 'on')",
            n = quote_ident(name),
            c = quote_literal(conninfo),
            s = quote_literal(name),
        ),
    )
    .await
}

/// Drops the subscription without touching the source (its slot is dropped there by
/// [`drop_slot`]): works whether or not the source accepts connections.
pub async fn drop_subscription(db: &mut PgConnection, name: &str) -> Result<()> {
    let exists = sqlx::query("SELECT 1 FROM pg_subscription WHERE subname = $1")
        .bind(name)
        .fetch_optional(&mut *db)
        .await?
        .is_some();
    if !exists {
        return Ok(());
    }
    let n = quote_ident(name);
    exec(&mut *db, format!("ALTER SUBSCRIPTION {n} DISABLE")).await?;
    exec(
        &mut *db,
        format!("ALTER SUBSCRIPTION {n} SET (slot_name = NONE)"),
    )
    .await?;
    exec(db, format!("DROP SUBSCRIPTION {n}")).await
}

/// Drops the move's replication slot on the source, and the table-sync slots of its
/// subscription (`pg_<suboid>_sync_*`, left behind when a copy stops half-way), ending any
/// walsender still using them.
pub async fn drop_slots(conn: &mut PgConnection, name: &str, sub_oid: Option<i64>) -> Result<()> {
    let sync = sub_oid.map(|oid| format!("pg\\_{oid}\\_sync\\_%"));
    for _ in 0..100 {
        let slots: Vec<(String, Option<i32>)> = sqlx::query_as(
            "SELECT slot_name::text, active_pid FROM pg_replication_slots
              WHERE slot_name = $1 OR ($2::text IS NOT NULL AND slot_name LIKE $2)",
        )
        .bind(name)
        .bind(&sync)
        .fetch_all(&mut *conn)
        .await?;
        if slots.is_empty() {
            return Ok(());
        }
        for (slot, pid) in slots {
            if let Some(pid) = pid {
                sqlx::query("SELECT pg_terminate_backend($1)")
                    .bind(pid)
                    .execute(&mut *conn)
                    .await?;
                continue;
            }
            // A walsender may take it between our look and the drop: the next round retries.
            let _ = sqlx::query("SELECT pg_drop_replication_slot($1)")
                .bind(&slot)
                .execute(&mut *conn)
                .await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(sqlx::Error::Protocol(format!(
        "replication slot {name} stays in use; end its walsender and drop it with pg_drop_replication_slot"
    )))
}

/// The subscription's oid on the target (names its table-sync slots on the source).
pub async fn subscription_oid(db: &mut PgConnection, name: &str) -> Result<Option<i64>> {
    sqlx::query_scalar("SELECT oid::int8 FROM pg_subscription WHERE subname = $1")
        .bind(name)
        .fetch_optional(db)
        .await
}

/// Copy progress of a subscription: (tables ready, tables in all, bytes copied by running
/// table syncs, rows copied by them).
pub struct CopyState {
    pub ready: i64,
    pub total: i64,
    pub syncing: Vec<String>,
    pub copying_bytes: i64,
    pub copying_rows: i64,
    pub errors: i64,
}

pub async fn copy_state(db: &mut PgConnection, name: &str) -> Result<CopyState> {
    let row = sqlx::query(
        "SELECT count(*) FILTER (WHERE r.srsubstate = 'r') AS ready, count(*) AS total,
                coalesce(array_agg(r.srrelid::regclass::text) FILTER (WHERE r.srsubstate <> 'r'), '{}') AS syncing,
                (SELECT coalesce(sum(bytes_processed), 0)::int8 FROM pg_stat_progress_copy
                  WHERE datname = current_database()) AS copying_bytes,
                (SELECT coalesce(sum(tuples_processed), 0)::int8 FROM pg_stat_progress_copy
                  WHERE datname = current_database()) AS copying_rows,
                (SELECT coalesce(apply_error_count + sync_error_count, 0) FROM pg_stat_subscription_stats
                  WHERE subname = $1) AS errors
           FROM pg_subscription s JOIN pg_subscription_rel r ON r.srsubid = s.oid
          WHERE s.subname = $1",
    )
    .bind(name)
    .fetch_one(db)
    .await?;
    Ok(CopyState {
        ready: row.try_get("ready")?,
        total: row.try_get("total")?,
        syncing: row.try_get("syncing")?,
        copying_bytes: row.try_get("copying_bytes")?,
        copying_rows: row.try_get("copying_rows")?,
        errors: row.try_get::<Option<i64>, _>("errors")?.unwrap_or(0),
    })
}

/// The source's WAL insert position, as bytes from 0/0.
pub async fn wal_insert_lsn(conn: &mut PgConnection) -> Result<i64> {
    sqlx::query_scalar("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::int8")
        .fetch_one(conn)
        .await
}

/// A WAL position at or past every commit made so far, flushed to disk. The position is a
/// transactional logical message (`pg_logical_emit_message`, which pgoutput does not forward)
/// committed with `synchronous_commit = on`: because the transaction writes WAL, its commit
/// flushes at once, and a walsender only sends what is flushed. (A transaction that only takes
/// an xid writes no WAL of its own, so PostgreSQL commits it asynchronously whatever
/// `synchronous_commit` says, and its position reached the walsender only with the WAL
/// writer, in two `wal_writer_delay` rounds: the ~400 ms cutover wait measured before.)
pub async fn flushed_wal_position(conn: &mut PgConnection, job: i64) -> Result<i64> {
    use sqlx::Connection;
    let mut tx = conn.begin().await?;
    sqlx::query("SET LOCAL synchronous_commit = on")
        .execute(&mut *tx)
        .await?;
    let lsn: i64 = sqlx::query_scalar(
        "SELECT (pg_logical_emit_message(true, 'podrouter', $1) - '0/0'::pg_lsn)::int8",
    )
    .bind(format!("move {job}: cutover position"))
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(lsn)
}

/// The source WAL position up to which the subscriber has applied and flushed every
/// transaction (bytes from 0/0), read from the source slot's `confirmed_flush_lsn`; None
/// before its first report. (The subscriber's `pg_stat_subscription.latest_end_lsn` is not
/// this: it follows the sender's keepalives, so it can run ahead of what was applied.)
pub async fn confirmed_lsn(src: &mut PgConnection, slot: &str) -> Result<Option<i64>> {
    sqlx::query_scalar(
        "SELECT (confirmed_flush_lsn - '0/0'::pg_lsn)::int8 FROM pg_replication_slots
          WHERE slot_name = $1",
    )
    .bind(slot)
    .fetch_optional(src)
    .await
    .map(Option::flatten)
}

/// Write transactions on the tenant database older than `age`.
pub async fn long_writers(conn: &mut PgConnection, tenant: &str, age: Duration) -> Result<i64> {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
          WHERE datname = $1 AND backend_xid IS NOT NULL AND xact_start < now() - $2::interval",
    )
    .bind(tenant)
    .bind(format!("{} milliseconds", age.as_millis()))
    .fetch_one(conn)
    .await
}

// === fence ===

/// Fences the source: no new connection to the tenant's database (superusers included),
/// and every client backend on it but `keep` ended. Replication senders stay.
pub async fn fence(conn: &mut PgConnection, tenant: &str, keep: i32) -> Result<()> {
    exec(
        &mut *conn,
        format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS false",
            quote_ident(tenant)
        ),
    )
    .await?;
    for _ in 0..200 {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
              WHERE datname = $1 AND pid <> $2 AND pid <> pg_backend_pid()
                AND backend_type = 'client backend'",
        )
        .bind(tenant)
        .bind(keep)
        .fetch_one(&mut *conn)
        .await?;
        if left == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    Err(sqlx::Error::Protocol(format!(
        "sessions on {tenant} did not end after pg_terminate_backend"
    )))
}

pub async fn unfence(conn: &mut PgConnection, database: &str) -> Result<()> {
    exec(
        conn,
        format!(
            "ALTER DATABASE {} ALLOW_CONNECTIONS true",
            quote_ident(database)
        ),
    )
    .await
}

// === sequences ===

/// Every sequence's last value on the source (None: never used).
pub async fn read_sequences(db: &mut PgConnection) -> Result<Vec<(String, String, Option<i64>)>> {
    sqlx::query_as("SELECT schemaname::text, sequencename::text, last_value FROM pg_sequences")
        .fetch_all(db)
        .await
}

pub async fn write_sequences(
    db: &mut PgConnection,
    seqs: &[(String, String, Option<i64>)],
) -> Result<()> {
    let used: Vec<_> = seqs.iter().filter(|s| s.2.is_some()).collect();
    if used.is_empty() {
        return Ok(());
    }
    let schemas: Vec<&str> = used.iter().map(|s| s.0.as_str()).collect();
    let names: Vec<&str> = used.iter().map(|s| s.1.as_str()).collect();
    let values: Vec<i64> = used.iter().map(|s| s.2.unwrap_or(0)).collect();
    sqlx::query(
        "SELECT setval(format('%I.%I', s, n)::regclass, v, true)
           FROM unnest($1::text[], $2::text[], $3::int8[]) AS x(s, n, v)",
    )
    .bind(&schemas)
    .bind(&names)
    .bind(&values)
    .execute(db)
    .await?;
    Ok(())
}

// === the source afterwards ===

pub async fn database_exists(conn: &mut PgConnection, name: &str) -> Result<bool> {
    crate::podadmin::database_exists(conn, name).await
}

/// Renames the (fenced) source database out of the way; it stays closed to connections.
pub async fn rename_database(conn: &mut PgConnection, from: &str, to: &str) -> Result<()> {
    exec(
        conn,
        format!(
            "ALTER DATABASE {} RENAME TO {}",
            quote_ident(from),
            quote_ident(to)
        ),
    )
    .await
}

pub async fn drop_database(conn: &mut PgConnection, name: &str) -> Result<()> {
    crate::podadmin::drop_database(conn, name).await
}

/// A libpq connection string (URI form) for `database` on the server of `admin_url`.
pub fn conninfo(admin_url: &str, database: &str) -> String {
    let (base, query) = match admin_url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (admin_url, None),
    };
    let (scheme, rest) = base.split_once("://").unwrap_or(("postgres", base));
    let authority = rest.split('/').next().unwrap_or(rest);
    let db: String = database
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect();
    match query {
        Some(q) => format!("{scheme}://{authority}/{db}?{q}"),
        None => format!("{scheme}://{authority}/{db}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_postgres_identifiers() {
        assert_eq!(object_name(42), "podrouter_move_42");
        assert_eq!(kept_name("acme", 7), "acme_moved_7");
        let long = "t".repeat(63);
        assert_eq!(kept_name(&long, 12345).len(), 63);
        assert!(kept_name(&long, 12345).ends_with("_moved_12345"));
    }

    #[test]
    fn conninfo_points_at_the_tenant_database() {
        assert_eq!(
            conninfo("postgres://postgres@127.0.0.1:5432", "acme"),
            "postgres://postgres@127.0.0.1:5432/acme"
        );
        assert_eq!(
            conninfo("postgres://u:p@h:1/postgres?sslmode=require", "a b"),
            "postgres://u:p@h:1/a%20b?sslmode=require"
        );
    }
}
