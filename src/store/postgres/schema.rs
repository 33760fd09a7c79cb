//! The schema, created or migrated at start (and by `idemgate migrate`)
//! under a version table, in one transaction guarded by an advisory lock so
//! replicas starting together migrate once.

use tokio_postgres::Client;

use crate::store::error::StoreError;

/// The schema version this build writes and reads.
pub const VERSION: i32 = 4;

/// The DDL and functions, `{schema}` and `{channel}` still to fill in.
const SCHEMA: &str = include_str!("schema.sql");

/// `"name"`: an identifier the config checked (letters, digits, `_`).
pub fn quoted(schema: &str) -> String {
    format!("\"{schema}\"")
}

/// The waiters' `NOTIFY` channel of a schema.
pub fn channel(schema: &str) -> String {
    let mut c = format!("{schema}_done");
    c.truncate(63);
    c
}

/// The replay caches' invalidation channel of a schema: a purged or
/// discarded record's key (hex).
pub fn replays_channel(schema: &str) -> String {
    let mut c = format!("{schema}_replays");
    c.truncate(63);
    c
}

/// The schema's version, if it has been created.
async fn version(client: &Client, q: &str) -> Result<Option<i32>, tokio_postgres::Error> {
    let table = format!("{q}.schema_version");
    let row = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&table])
        .await?;
    if !row.get::<_, bool>(0) {
        return Ok(None);
    }
    let row = client
        .query_one(&format!("SELECT max(version) FROM {table}"), &[])
        .await?;
    Ok(row.get(0))
}

fn too_new(schema: &str, v: i32) -> StoreError {
    StoreError::Unavailable(format!(
        "schema {schema} is at version {v}, newer than this build's {VERSION}: run a newer idemgate"
    ))
}

/// Brings `schema` to [`VERSION`]; what it did, for the log.
pub async fn migrate(client: &mut Client, schema: &str) -> Result<String, StoreError> {
    let q = quoted(schema);
    // tokio-postgres says only "db error"; the server's message says why.
    let unavailable = |e: tokio_postgres::Error| {
        let why = e
            .as_db_error()
            .map_or_else(|| e.to_string(), |db| db.message().to_owned());
        StoreError::Unavailable(format!("migrating schema {schema}: {why}"))
    };
    // Already current: nothing to lock or create, so a role without the
    // CREATE privilege can run on a schema `idemgate migrate` made.
    match version(client, &q).await.map_err(unavailable)? {
        Some(v) if v == VERSION => return Ok(format!("schema {schema} is at version {VERSION}")),
        Some(v) if v > VERSION => return Err(too_new(schema, v)),
        _ => {}
    }
    let tx = client.transaction().await.map_err(unavailable)?;
    // One migration at a time across replicas: keyed by the schema's name.
    tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&schema])
        .await
        .map_err(unavailable)?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {q}; \
         CREATE TABLE IF NOT EXISTS {q}.schema_version \
            (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
    ))
    .await
    .map_err(unavailable)?;
    let current: Option<i32> = tx
        .query_one(&format!("SELECT max(version) FROM {q}.schema_version"), &[])
        .await
        .map_err(unavailable)?
        .get(0);
    let done = match current {
        Some(v) if v > VERSION => return Err(too_new(schema, v)),
        Some(v) if v == VERSION => format!("schema {schema} is at version {VERSION}"),
        _ => {
            let sql = SCHEMA
                .replace("{schema}", &q)
                .replace("{channel}", &channel(schema))
                .replace("{replays}", &replays_channel(schema));
            tx.batch_execute(&sql).await.map_err(unavailable)?;
            tx.execute(
                &format!("INSERT INTO {q}.schema_version (version) VALUES ($1)"),
                &[&VERSION],
            )
            .await
            .map_err(unavailable)?;
            match current {
                Some(v) => format!("schema {schema} migrated from version {v} to {VERSION}"),
                None => format!("schema {schema} created at version {VERSION}"),
            }
        }
    };
    tx.commit().await.map_err(unavailable)?;
    Ok(done)
}
