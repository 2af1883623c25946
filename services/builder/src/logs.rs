//! Build logs: every line a step prints is stored (`build_logs`) as it comes,
//! so `Builds.StreamLogs` can replay and follow it from any replica.

use sqlx::PgPool;
use uuid::Uuid;

/// Writes the log of one attempt of one build.
#[derive(Clone)]
pub struct LogSink {
    pool: PgPool,
    build_id: Uuid,
    attempt: i32,
}

impl LogSink {
    pub fn new(pool: PgPool, build_id: Uuid, attempt: i32) -> Self {
        Self {
            pool,
            build_id,
            attempt,
        }
    }

    /// Appends a chunk; a database hiccup loses log lines, never the build.
    pub async fn write(&self, step: &str, stream: &str, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let r = sqlx::query(
            "INSERT INTO build_logs (build_id, attempt, step, stream, data) VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(self.build_id)
        .bind(self.attempt)
        .bind(step)
        .bind(stream)
        .bind(data)
        .execute(&self.pool)
        .await;
        if let Err(e) = r {
            tracing::warn!(build_id = %self.build_id, error = %e, "could not store a log line");
        }
    }

    /// A line from the builder itself.
    pub async fn system(&self, step: &str, line: impl AsRef<str>) {
        let mut text = line.as_ref().to_owned();
        text.push('\n');
        self.write(step, "system", text.as_bytes()).await;
    }
}
