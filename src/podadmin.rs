//! Administrative work on a pod's primary, over its admin URL: roles with the catalog's
//! SCRAM verifiers, tenant databases, health. Identifiers and literals are quoted here, once.

use crate::proxy::server::{quote_ident, quote_literal};
use sqlx::{ConnectOptions, Connection, PgConnection, Row};
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
    let verb = if exists { "ALTER" } else { "CREATE" };
    // A verifier given as the password is stored as-is by Postgres (never re-hashed).
    let sql = format!(
        "{verb} ROLE {} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD {}",
        quote_ident(name),
        quote_literal(verifier)
    );
    sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .execute(&mut *conn)
        .await?;
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

/// "up" when the primary answers a query within the timeout, else "down: reason".
pub async fn health(admin_url: &str, timeout: Duration) -> String {
    let probe = async {
        let mut c = connect(admin_url, None).await?;
        let row = sqlx::query("SELECT pg_is_in_recovery() AS r")
            .fetch_one(&mut c)
            .await?;
        let in_recovery: bool = row.try_get("r")?;
        let _ = c.close().await;
        Ok::<_, sqlx::Error>(if in_recovery {
            "up (in recovery)".to_owned()
        } else {
            "up".to_owned()
        })
    };
    match tokio::time::timeout(timeout, probe).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => format!("down: {}", short(&e)),
        Err(_) => format!("down: no answer within {timeout:?}"),
    }
}

fn short(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Io(io) => io.to_string(),
        sqlx::Error::Database(d) => d.message().to_owned(),
        other => other.to_string(),
    }
}
