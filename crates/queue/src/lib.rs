//! Leased work queues in Postgres: one mechanism for the builder's builds,
//! the deployer's deployments and the notifier's outgoing calls.
//!
//! A queue is a table whose rows have `id` (UUID or BIGINT), `state`,
//! `owner`, `attempt` and `lease_until`, described by a [`Queue`]. The rules,
//! written once here:
//!
//! - **Claim.** A row can be claimed when it is waiting (its state is the
//!   queue's `waiting` state) and the queue's `ready` condition holds, or
//!   when it is running and its lease ran out — whoever held it, this
//!   replica included: a holder that stopped renewing has lost it. One
//!   `UPDATE` over `FOR UPDATE SKIP LOCKED` takes the first candidates in
//!   the queue's order: state running, owner, `attempt + 1`, a fresh lease,
//!   and the queue's own `on_claim` assignments. The caller gets a [`Claim`]
//!   inside its transaction, so it can write what the claim means (an event)
//!   in the same commit. A claim that would break a unique index (another
//!   replica just took the same kind of work) is no claim.
//! - **Renew.** The holder extends the lease every third of it ([`hold`]).
//!   A renewal that finds the row no longer running under its owner and
//!   attempt means the claim was lost (it was taken over): the work is
//!   stopped.
//! - **Finish.** Whatever ends the work is written under [`Queue::held`], the
//!   condition that the claim still holds; a lost claim writes nothing.
//! - **Give back.** On shutdown a holder may give its claim back: waiting
//!   again, `attempt - 1` (a give-back is not an attempt), lease cleared.
//! - **Crash.** A holder that dies, even between its claim and its first
//!   renewal, just stops renewing: the lease runs out and the row is claimed
//!   again with the next attempt number.

use std::future::Future;
use std::time::Duration;

use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

/// A table of leased work.
#[derive(Debug, Clone, Copy)]
pub struct Queue {
    /// The table (in the service's schema).
    pub table: &'static str,
    /// The state of work that waits to be claimed (`queued`, `waiting`...).
    pub waiting: &'static str,
    /// The state of claimed work.
    pub running: &'static str,
    /// A further SQL condition on a waiting row (the row is `q`), e.g. that
    /// nothing runs in its environment; `TRUE` for none.
    pub ready: &'static str,
    /// The SQL order in which candidates are taken (over `q`).
    pub order: &'static str,
    /// More `column = value` assignments made when a row is claimed (may
    /// use the row's own columns), or empty.
    pub on_claim: &'static str,
}

/// A claimed row: what its holder must show to renew it or to finish it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim<Id> {
    pub id: Id,
    pub owner: String,
    pub attempt: i32,
}

/// How holding a claim ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Held<T> {
    /// The work ran to its end (its result), still holding the claim.
    Done(T),
    /// The claim was lost (taken over); the work was stopped.
    Lost,
    /// Shutdown stopped the work; the claim was given back.
    GivenBack,
}

impl Queue {
    /// The SQL condition that the claim in `$1` (id), `$2` (owner), `$3`
    /// (attempt) still holds, for the statements that finish the work.
    pub fn held(&self) -> String {
        format!(
            "id = $1 AND owner = $2 AND attempt = $3 AND state = '{}'",
            self.running
        )
    }

    /// Claims up to `limit` rows for `owner` under a lease of `lease`, in
    /// `tx`; see the module's rules.
    pub async fn claim_many<Id>(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        owner: &str,
        lease: Duration,
        limit: i64,
    ) -> sqlx::Result<Vec<Claim<Id>>>
    where
        Id: for<'r> sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres> + Send + Unpin,
    {
        let on_claim = if self.on_claim.is_empty() {
            String::new()
        } else {
            format!(", {}", self.on_claim)
        };
        let sql = format!(
            "UPDATE {table} SET state = '{running}', owner = $1, attempt = attempt + 1,
                    lease_until = now() + make_interval(secs => $2){on_claim}
             WHERE id IN (SELECT q.id FROM {table} q
                          WHERE (q.state = '{waiting}' AND ({ready}))
                             OR (q.state = '{running}' AND q.lease_until < now())
                          ORDER BY {order}
                          LIMIT $3
                          FOR UPDATE SKIP LOCKED)
             RETURNING id, attempt",
            table = self.table,
            running = self.running,
            waiting = self.waiting,
            ready = self.ready,
            order = self.order,
        );
        // Held back on a unique violation: the savepoint keeps `tx` usable.
        let mut savepoint = sqlx::Connection::begin(&mut **tx).await?;
        let rows: Result<Vec<(Id, i32)>, sqlx::Error> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
            .bind(owner)
            .bind(lease.as_secs_f64())
            .bind(limit)
            .fetch_all(&mut *savepoint)
            .await;
        match rows {
            Ok(rows) => {
                savepoint.commit().await?;
                Ok(rows
                    .into_iter()
                    .map(|(id, attempt)| Claim {
                        id,
                        owner: owner.to_owned(),
                        attempt,
                    })
                    .collect())
            }
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                savepoint.rollback().await?;
                Ok(Vec::new())
            }
            Err(e) => Err(e),
        }
    }

    /// Claims the next row, if any; see [`Queue::claim_many`].
    pub async fn claim<Id>(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        owner: &str,
        lease: Duration,
    ) -> sqlx::Result<Option<Claim<Id>>>
    where
        Id: for<'r> sqlx::Decode<'r, Postgres> + sqlx::Type<Postgres> + Send + Unpin,
    {
        Ok(self.claim_many(tx, owner, lease, 1).await?.pop())
    }

    /// Extends the lease; `false` when the claim no longer holds.
    pub async fn renew<Id>(
        &self,
        pool: &PgPool,
        claim: &Claim<Id>,
        lease: Duration,
    ) -> sqlx::Result<bool>
    where
        Id: for<'q> sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres> + Clone + Send + Sync,
    {
        let sql = format!(
            "UPDATE {} SET lease_until = now() + make_interval(secs => $4) WHERE {}",
            self.table,
            self.held()
        );
        let done = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(claim.id.clone())
            .bind(&claim.owner)
            .bind(claim.attempt)
            .bind(lease.as_secs_f64())
            .execute(pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Gives the claim back: waiting again, the attempt not counted.
    /// `false` when it no longer held.
    pub async fn give_back<Id>(&self, pool: &PgPool, claim: &Claim<Id>) -> sqlx::Result<bool>
    where
        Id: for<'q> sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres> + Clone + Send + Sync,
    {
        let sql = format!(
            "UPDATE {} SET state = '{}', owner = NULL, lease_until = NULL, attempt = attempt - 1
             WHERE {}",
            self.table,
            self.waiting,
            self.held()
        );
        let done = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(claim.id.clone())
            .bind(&claim.owner)
            .bind(claim.attempt)
            .execute(pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }
}

/// Runs `work` while holding `claim`: renews the lease every third of
/// `lease`, stops the work when a renewal finds the claim lost, and — when
/// `shutdown` is given and cancelled first — stops it and gives the claim
/// back. A renewal that fails (the database away) is tried again at the
/// next tick; the lease covers two missed renewals.
pub async fn hold<Id, T>(
    queue: &Queue,
    pool: &PgPool,
    claim: &Claim<Id>,
    lease: Duration,
    work: impl Future<Output = T>,
    shutdown: Option<&CancellationToken>,
) -> Held<T>
where
    Id: for<'q> sqlx::Encode<'q, Postgres>
        + sqlx::Type<Postgres>
        + Clone
        + Send
        + Sync
        + std::fmt::Debug,
{
    let renew = async {
        let mut tick = tokio::time::interval(lease / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            match queue.renew(pool, claim, lease).await {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => tracing::warn!(id = ?claim.id, error = %e, "cannot renew a lease yet"),
            }
        }
    };
    let stop = async {
        match shutdown {
            Some(s) => s.cancelled().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        out = work => Held::Done(out),
        () = renew => {
            tracing::warn!(id = ?claim.id, "lease lost: the work was taken over");
            Held::Lost
        }
        () = stop => {
            match queue.give_back(pool, claim).await {
                Ok(_) => tracing::info!(id = ?claim.id, "shutting down; work given back to the queue"),
                Err(e) => tracing::warn!(id = ?claim.id, error = %e, "cannot give the work back; its lease will run out"),
            }
            Held::GivenBack
        }
    }
}
