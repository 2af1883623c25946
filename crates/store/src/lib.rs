//! Postgres plumbing shared by the services.
//!
//! Every service owns one schema in the shared database (`ingest`, `builder`,
//! `publisher`, ...). [`connect`] creates that schema if needed, pins the
//! pool's `search_path` to it, creates the shared plumbing tables (the
//! transactional outbox and the processed-event ledger) and runs the service's
//! own embedded migrations there. No service reads another's schema.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool, Postgres, Transaction};

/// The outbox: events a service must publish after a state change, written in
/// the same transaction as the change and relayed to the broker afterwards.
/// The processed-event ledger makes consumers idempotent by event id.
const PLUMBING: &str = include_str!("../plumbing.sql");

/// Connects to `database_url`, prepares `schema` and runs `migrator` in it.
pub async fn connect(
    database_url: &str,
    schema: &str,
    migrator: &Migrator,
) -> anyhow::Result<PgPool> {
    anyhow::ensure!(
        !schema.is_empty() && schema.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
        "schema name {schema:?} must be lowercase letters and underscores"
    );
    let base: PgConnectOptions = database_url
        .parse()
        .map_err(|e| anyhow::Error::new(e).context("DATABASE_URL is not a valid Postgres URL"))?;
    let base = base.log_statements(tracing::log::LevelFilter::Trace);
    {
        let mut conn = base.connect().await?;
        // `schema` is checked above to be lowercase letters and underscores.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS {schema}"
        )))
        .execute(&mut conn)
        .await?;
    }
    let opts = base.options([("search_path", schema)]);
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(opts)
        .await?;
    // Serialise plumbing creation across replicas starting together.
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(schema)
        .execute(&mut *tx)
        .await?;
    sqlx::raw_sql(PLUMBING).execute(&mut *tx).await?;
    tx.commit().await?;
    migrator.run(&pool).await?;
    Ok(pool)
}

/// Whether the database answers (for readiness).
pub async fn ping(pool: &PgPool) -> bool {
    tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query("SELECT 1").execute(pool),
    )
    .await
    .is_ok_and(|r| r.is_ok())
}

/// One row of the outbox.
#[derive(Debug, Clone)]
pub struct OutboxRow {
    pub seq: i64,
    pub event_id: String,
    pub routing_key: String,
    pub pipeline_id: String,
    pub payload: Vec<u8>,
    pub traceparent: Option<String>,
}

/// Puts an encoded event in the outbox, inside the caller's transaction.
pub async fn outbox_insert(
    tx: &mut Transaction<'_, Postgres>,
    event_id: &str,
    routing_key: &str,
    pipeline_id: &str,
    payload: &[u8],
    traceparent: Option<&str>,
) -> sqlx::Result<()> {
    sqlx::query!(
        "INSERT INTO outbox (event_id, routing_key, pipeline_id, payload, traceparent)
         VALUES ($1, $2, $3, $4, $5)",
        event_id,
        routing_key,
        pipeline_id,
        payload,
        traceparent,
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Locks up to `limit` unpublished outbox rows, oldest first; rows locked by
/// another relay (another replica) are skipped.
pub async fn outbox_lock_batch(
    tx: &mut Transaction<'_, Postgres>,
    limit: i64,
) -> sqlx::Result<Vec<OutboxRow>> {
    sqlx::query_as!(
        OutboxRow,
        "SELECT seq, event_id, routing_key, pipeline_id, payload, traceparent
         FROM outbox ORDER BY seq LIMIT $1 FOR UPDATE SKIP LOCKED",
        limit,
    )
    .fetch_all(&mut **tx)
    .await
}

/// Removes relayed rows (the broker confirmed them).
pub async fn outbox_delete(tx: &mut Transaction<'_, Postgres>, seqs: &[i64]) -> sqlx::Result<()> {
    sqlx::query!("DELETE FROM outbox WHERE seq = ANY($1)", seqs)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Records that `event_id` is being handled; `false` if it already was
/// (a redelivery), in which case the caller does nothing but ack.
pub async fn first_delivery(
    tx: &mut Transaction<'_, Postgres>,
    event_id: &str,
) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        "INSERT INTO processed_events (event_id) VALUES ($1) ON CONFLICT DO NOTHING",
        event_id
    )
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}
