//! Administrative work on a pod's servers, over their admin URLs: roles with the catalog's
//! SCRAM verifiers, tenant databases, and the steps of a failover (fence, promote, WAL
//! positions). Identifiers and literals are quoted here, once.

use crate::proxy::server::{quote_ident, quote_literal};
use sqlx::{ConnectOptions, PgConnection};
use std::str::FromStr;
use std::time::Duration;

pub type Result<T> = std::result::Result<T, sqlx::Error>;

/// Connects to `database` on the pod (default `postgres`) as its admin user.
pub async fn connect(admin_url: &str, database: Option<&str>) -> Result<PgConnection> {
    let mut opts = sqlx::postgres::PgConnectOptions::from_str(admin_url)?
        .application_name("podrouter-admin")
        .log_statements(tracing::log::LevelFilter::Debug);
    opts = opts.database(database.unwrap_or("postgres"));
    tokio::time::timeout(Duration::from_secs(10), opts.connect())
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)?
}

/// Creates the login role or brings its verifier in line with the catalog's.
pub async fn ensure_role(conn: &mut PgConnection, name: &str, verifier: &str) -> Result<()> {
    let exists = sqlx::query("SELECT 1 FROM pg_roles WHERE rolname = $1")
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?
        .is_some();
    // A verifier given as the password is stored as-is by Postgres (never re-hashed).
    let sql = |verb: &str| {
        format!(
            "{verb} ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}",
            quote_ident(name),
            quote_literal(verifier)
        )
    };
    let made = sqlx::raw_sql(sqlx::AssertSqlSafe(sql(if exists {
        "ALTER"
    } else {
        "CREATE"
    })))
    .execute(&mut *conn)
    .await;
    match made {
        // Created by another session since the check (two moves to one new pod at once).
        Err(sqlx::Error::Database(d))
            if !exists && matches!(d.code().as_deref(), Some("23505" | "42710")) =>
        {
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql("ALTER")))
                .execute(&mut *conn)
                .await?;
        }
        other => {
            other?;
        }
    }
    Ok(())
}

pub async fn database_exists(conn: &mut PgConnection, name: &str) -> Result<bool> {
    Ok(sqlx::query("SELECT 1 FROM pg_database WHERE datname = $1")
        .bind(name)
        .fetch_optional(&mut *conn)
        .await?
        .is_some())
}

/// Creates a tenant database owned by `owner`, reachable only by the granted roles.
pub async fn create_database(
    conn: &mut PgConnection,
    name: &str,
    owner: &str,
    grants: &[String],
) -> Result<()> {
    let db = quote_ident(name);
    exec(
        conn,
        format!("CREATE DATABASE {db} OWNER {}", quote_ident(owner)),
    )
    .await?;
    exec(conn, format!("REVOKE ALL ON DATABASE {db} FROM PUBLIC")).await?;
    for role in grants {
        exec(
            conn,
            format!(
                "GRANT CONNECT, TEMPORARY ON DATABASE {db} TO {}",
                quote_ident(role)
            ),
        )
        .await?;
    }
    Ok(())
}

pub async fn drop_database(conn: &mut PgConnection, name: &str) -> Result<()> {
    exec(
        conn,
        format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(name)),
    )
    .await
}

async fn exec(conn: &mut PgConnection, sql: String) -> Result<()> {
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(conn)
        .await?;
    Ok(())
}

// === failover steps ===

/// The server's WAL position in bytes from 0/0: written on a primary, replayed on a standby.
pub async fn wal_position(conn: &mut PgConnection) -> Result<u64> {
    let lsn: Option<i64> = sqlx::query_scalar(
        "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()
                      ELSE pg_current_wal_lsn() END - '0/0'::pg_lsn)::int8",
    )
    .fetch_one(conn)
    .await?;
    Ok(lsn.unwrap_or(0) as u64)
}

/// Fences a primary before a switchover: new transactions are read-only (with ALTER SYSTEM,
/// so a restart keeps it so), and sessions on `databases` (the pod's tenants) are ended so no
/// write transaction stays open; waits up to `wait` for them to go.
pub async fn fence(conn: &mut PgConnection, databases: &[String], wait: Duration) -> Result<()> {
    exec(
        conn,
        "ALTER SYSTEM SET default_transaction_read_only = on".into(),
    )
    .await?;
    sqlx::query("SELECT pg_reload_conf()")
        .execute(&mut *conn)
        .await?;
    let sessions =
        "SELECT pid FROM pg_stat_activity WHERE datname = ANY($1) AND pid <> pg_backend_pid()";
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let pids: Vec<i32> = sqlx::query_scalar(sessions)
            .bind(databases)
            .fetch_all(&mut *conn)
            .await?;
        if pids.is_empty() || tokio::time::Instant::now() >= deadline {
            return Ok(());
        }
        sqlx::query("SELECT pg_terminate_backend(pid) FROM unnest($1::int4[]) AS pid")
            .bind(&pids)
            .execute(&mut *conn)
            .await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Undoes [`fence`] (a switchover that failed before the route switch).
pub async fn unfence(conn: &mut PgConnection) -> Result<()> {
    exec(
        conn,
        "ALTER SYSTEM RESET default_transaction_read_only".into(),
    )
    .await?;
    sqlx::query("SELECT pg_reload_conf()").execute(conn).await?;
    Ok(())
}

/// Promotes a standby and waits (up to `wait`) until it is out of recovery; false when it
/// did not get there in time.
pub async fn promote(conn: &mut PgConnection, wait: Duration) -> Result<bool> {
    let secs = wait.as_secs().clamp(1, 3600) as i32;
    let promoted: bool = sqlx::query_scalar("SELECT pg_promote(true, $1)")
        .bind(secs)
        .fetch_one(&mut *conn)
        .await?;
    let in_recovery: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()")
        .fetch_one(conn)
        .await?;
    Ok(promoted && !in_recovery)
}

/// Empties `synchronous_standby_names` on a new primary and returns what it was. A promoted
/// standby may carry its old primary's list (copied by pg_basebackup), naming standbys that
/// are gone or itself; left in place, every commit would wait forever.
pub async fn clear_synchronous_standbys(conn: &mut PgConnection) -> Result<Option<String>> {
    let names: String = sqlx::query_scalar("SELECT current_setting('synchronous_standby_names')")
        .fetch_one(&mut *conn)
        .await?;
    if names.trim().is_empty() {
        return Ok(None);
    }
    exec(
        conn,
        "ALTER SYSTEM SET synchronous_standby_names = ''".into(),
    )
    .await?;
    sqlx::query("SELECT pg_reload_conf()").execute(conn).await?;
    Ok(Some(names))
}

/// A short reason for a failed admin call, for health lines and messages.
pub(crate) fn short(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Io(io) => io.to_string(),
        sqlx::Error::Database(d) => d.message().to_owned(),
        other => other.to_string(),
    }
}

/// What the admin user of a server may do, and whether the server is a primary.
#[derive(Debug, Clone)]
pub struct AdminFacts {
    pub user: String,
    pub superuser: bool,
    pub createdb: bool,
    pub createrole: bool,
    pub in_recovery: bool,
}

/// Checks a would-be pod primary before it is registered (`Fleet::add_pod`).
pub async fn admin_facts(conn: &mut PgConnection) -> Result<AdminFacts> {
    let row = sqlx::query(
        "SELECT current_user::text AS user, rolsuper, rolcreatedb, rolcreaterole, pg_is_in_recovery() AS in_recovery
           FROM pg_roles WHERE rolname = current_user",
    )
    .fetch_one(conn)
    .await?;
    use sqlx::Row;
    Ok(AdminFacts {
        user: row.try_get("user")?,
        superuser: row.try_get("rolsuper")?,
        createdb: row.try_get("rolcreatedb")?,
        createrole: row.try_get("rolcreaterole")?,
        in_recovery: row.try_get("in_recovery")?,
    })
}
