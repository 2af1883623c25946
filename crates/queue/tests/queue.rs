//! The lease rules, against a real Postgres (DATABASE_URL, as
//! scripts/infra.sh sets it): each test works in a schema of its own.

use std::time::Duration;

use gantry_queue::{Claim, Held, Queue, hold};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const LEASE: Duration = Duration::from_secs(30);

/// Drops a test's schema when the test ends, however it ends.
struct Scratch {
    url: String,
    schema: String,
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let (url, schema) = (self.url.clone(), self.schema.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let pool = PgPool::connect(&url).await.ok()?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP SCHEMA IF EXISTS {schema} CASCADE"
                )))
                .execute(&pool)
                .await
                .ok()
            })
        })
        .join();
    }
}

/// A pool on a fresh schema with a `jobs` table holding `n` waiting rows
/// (ids 1..=n, older first); rows of `group` 'b' are not ready.
async fn jobs(n: i64) -> (PgPool, Scratch) {
    let url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://gantry:gantry@127.0.0.1:5432/gantry".into());
    let schema = format!("queue_test_{}", uuid::Uuid::new_v4().simple());
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(4)
        .after_connect({
            let schema = schema.clone();
            move |conn, _| {
                let schema = schema.clone();
                Box::pin(async move {
                    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                        "CREATE SCHEMA IF NOT EXISTS {schema}; SET search_path TO {schema}"
                    )))
                    .execute(conn)
                    .await?;
                    Ok(())
                })
            }
        })
        .connect(&url)
        .await
        .expect("postgres (scripts/infra.sh)");
    sqlx::raw_sql(
        "CREATE TABLE jobs (
            id BIGINT PRIMARY KEY, grp TEXT NOT NULL DEFAULT 'a',
            state TEXT NOT NULL DEFAULT 'waiting', owner TEXT, attempt INT NOT NULL DEFAULT 0,
            lease_until TIMESTAMPTZ, claimed_at TIMESTAMPTZ, done_by TEXT)",
    )
    .execute(&pool)
    .await
    .expect("table");
    for id in 1..=n {
        sqlx::query("INSERT INTO jobs (id) VALUES ($1)")
            .bind(id)
            .execute(&pool)
            .await
            .expect("row");
    }
    (pool, Scratch { url, schema })
}

const JOBS: Queue = Queue {
    table: "jobs",
    waiting: "waiting",
    running: "running",
    ready: "q.grp <> 'b'",
    order: "q.id",
    on_claim: "claimed_at = now()",
};

async fn claim(pool: &PgPool, owner: &str, lease: Duration) -> Option<Claim<i64>> {
    let mut tx = pool.begin().await.expect("tx");
    let c = JOBS.claim(&mut tx, owner, lease).await.expect("claim");
    tx.commit().await.expect("commit");
    c
}

async fn expire(pool: &PgPool, id: i64) {
    sqlx::query("UPDATE jobs SET lease_until = now() - interval '1 second' WHERE id = $1")
        .bind(id)
        .execute(pool)
        .await
        .expect("expire");
}

/// Finishes the work under the claim; whether it was still held.
async fn finish(pool: &PgPool, c: &Claim<i64>) -> bool {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE jobs SET state = 'done', done_by = $2 WHERE {}",
        JOBS.held()
    )))
    .bind(c.id)
    .bind(&c.owner)
    .bind(c.attempt)
    .execute(pool)
    .await
    .expect("finish")
    .rows_affected()
        == 1
}

#[tokio::test]
async fn claims_take_the_oldest_ready_rows_once() {
    let (pool, _scratch) = jobs(3).await;
    sqlx::query("UPDATE jobs SET grp = 'b' WHERE id = 2")
        .execute(&pool)
        .await
        .expect("group");
    let a = claim(&pool, "a", LEASE).await.expect("one");
    let b = claim(&pool, "b", LEASE).await.expect("another");
    assert_eq!((a.id, a.attempt, b.id, b.attempt), (1, 1, 3, 1));
    assert_eq!(claim(&pool, "c", LEASE).await, None, "row 2 is not ready");
    let stamped: bool = sqlx::query_scalar("SELECT claimed_at IS NOT NULL FROM jobs WHERE id = 1")
        .fetch_one(&pool)
        .await
        .expect("row");
    assert!(stamped, "on_claim ran");

    // A batch takes what is ready, up to its limit.
    let (pool, _more) = jobs(5).await;
    let mut tx = pool.begin().await.expect("tx");
    let batch: Vec<Claim<i64>> = JOBS
        .claim_many(&mut tx, "x", LEASE, 3)
        .await
        .expect("batch");
    tx.commit().await.expect("commit");
    assert_eq!(batch.iter().map(|c| c.id).collect::<Vec<_>>(), [1, 2, 3]);
}

#[tokio::test]
async fn an_expired_lease_is_taken_over_even_by_its_own_replica() {
    let (pool, _scratch) = jobs(1).await;
    let first = claim(&pool, "a", LEASE).await.expect("claim");
    assert!(JOBS.renew(&pool, &first, LEASE).await.expect("renew"));
    assert_eq!(claim(&pool, "b", LEASE).await, None, "held");

    // The same replica, after its lease ran out, gets it as a new attempt.
    expire(&pool, 1).await;
    let again = claim(&pool, "a", LEASE)
        .await
        .expect("taken over by itself");
    assert_eq!(again.attempt, 2);
    assert!(
        !JOBS.renew(&pool, &first, LEASE).await.expect("renew"),
        "old attempt lost"
    );
    assert!(!finish(&pool, &first).await, "a lost claim records nothing");

    // Another replica takes over the second attempt the same way.
    expire(&pool, 1).await;
    let other = claim(&pool, "b", LEASE).await.expect("taken over");
    assert_eq!((other.owner.as_str(), other.attempt), ("b", 3));
    assert!(!finish(&pool, &again).await);
    assert!(finish(&pool, &other).await);
    let done_by: String = sqlx::query_scalar("SELECT done_by FROM jobs WHERE id = 1")
        .fetch_one(&pool)
        .await
        .expect("row");
    assert_eq!(done_by, "b");
    assert_eq!(claim(&pool, "c", LEASE).await, None, "done is done");
}

#[tokio::test]
async fn a_crash_between_claim_and_first_renewal_loses_nothing() {
    let (pool, _scratch) = jobs(1).await;
    // Claimed with a short lease, then never renewed (the holder died).
    let dead = claim(&pool, "dead", Duration::from_secs(1))
        .await
        .expect("claim");
    assert_eq!(claim(&pool, "next", LEASE).await, None, "held for now");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let next = claim(&pool, "next", LEASE).await.expect("after the lease");
    assert_eq!((next.id, next.attempt), (dead.id, 2));
}

#[tokio::test]
async fn giving_back_does_not_count_an_attempt() {
    let (pool, _scratch) = jobs(1).await;
    let c = claim(&pool, "a", LEASE).await.expect("claim");
    assert!(JOBS.give_back(&pool, &c).await.expect("give back"));
    assert!(
        !JOBS.give_back(&pool, &c).await.expect("twice"),
        "no longer held"
    );
    let again = claim(&pool, "b", LEASE).await.expect("claimable");
    assert_eq!(again.attempt, 1, "the given-back attempt does not count");
}

#[tokio::test]
async fn hold_renews_stops_lost_work_and_gives_back_on_shutdown() {
    let (pool, _scratch) = jobs(3).await;
    let lease = Duration::from_millis(900);

    // Renewed past its lease several times, the work completes.
    let c = claim(&pool, "a", lease).await.expect("claim");
    let out = hold(
        &JOBS,
        &pool,
        &c,
        lease,
        async {
            tokio::time::sleep(lease * 3).await;
            42
        },
        None,
    )
    .await;
    assert_eq!(out, Held::Done(42));
    assert!(finish(&pool, &c).await, "still held after 3 leases");

    // Taken over meanwhile: the work is stopped at the next renewal.
    let c = claim(&pool, "a", lease).await.expect("claim");
    let took = {
        let pool = pool.clone();
        async move {
            sqlx::query("UPDATE jobs SET attempt = attempt + 1, owner = 'b' WHERE id = 2")
                .execute(&pool)
                .await
                .expect("takeover");
        }
    };
    let out = hold(
        &JOBS,
        &pool,
        &c,
        lease,
        async {
            took.await;
            std::future::pending::<()>().await
        },
        None,
    )
    .await;
    assert_eq!(out, Held::Lost);

    // Shutdown stops the work and gives the row back.
    let c = claim(&pool, "a", lease).await.expect("claim");
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let out = hold(
        &JOBS,
        &pool,
        &c,
        lease,
        async move {
            stop.cancel();
            std::future::pending::<()>().await
        },
        Some(&shutdown),
    )
    .await;
    assert_eq!(out, Held::GivenBack);
    let state: (String, i32) = sqlx::query_as("SELECT state, attempt FROM jobs WHERE id = 3")
        .fetch_one(&pool)
        .await
        .expect("row");
    assert_eq!(state, ("waiting".into(), 0));
}

#[tokio::test]
async fn a_unique_index_makes_a_racing_claim_no_claim() {
    let (pool, _scratch) = jobs(2).await;
    // At most one running row per group, as the deployer's environments.
    sqlx::raw_sql("CREATE UNIQUE INDEX one_running ON jobs (grp) WHERE state = 'running'")
        .execute(&pool)
        .await
        .expect("index");
    const ONE_AT_A_TIME: Queue = Queue {
        ready: "TRUE",
        ..JOBS
    };
    let mut tx = pool.begin().await.expect("tx");
    let first: Option<Claim<i64>> = ONE_AT_A_TIME
        .claim(&mut tx, "a", LEASE)
        .await
        .expect("claim");
    assert!(first.is_some());
    let second: Option<Claim<i64>> = ONE_AT_A_TIME
        .claim(&mut tx, "a", LEASE)
        .await
        .expect("no error");
    assert_eq!(second, None);
    tx.commit().await.expect("the transaction is still usable");
}
