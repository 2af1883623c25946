//! Build logs: what every step prints is stored in `build_logs`, so
//! `Builds.StreamLogs` can replay and follow it from any replica.
//!
//! Writers hand chunks to a [`LogSink`], which never waits for the database:
//! a task per build merges consecutive chunks of one step and stream into
//! rows of up to [`ROW_BYTES`] and inserts them in batches, at least every
//! [`FLUSH_EVERY`], so a chatty step costs a few inserts a second rather than
//! one per chunk. The output of a build is capped ([`LogSink::new`]'s
//! `limit`): past it, a line says the log was cut and the rest is counted,
//! not stored; the builder's own lines are always kept, and the step's exit
//! code still decides. [`LogSink::close`] stores what is pending before the
//! verdict is written, so a finished build has all its rows. The project's
//! secrets are masked before anything is stored (see [`crate::mask`]), so
//! neither the stored log nor `StreamLogs` ever holds them.

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

use crate::mask::Masker;

/// Largest row of `build_logs`.
pub const ROW_BYTES: usize = 64 * 1024;
/// Longest a written chunk waits before it is stored.
pub const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// Pending bytes that make a batch be stored at once.
const BATCH_BYTES: usize = 512 * 1024;
/// Chunks queued towards the writer task before writers wait (backpressure
/// on a step that prints faster than the database stores).
const QUEUE: usize = 256;

enum Msg {
    Chunk {
        step: String,
        stream: &'static str,
        data: Vec<u8>,
    },
    Close(oneshot::Sender<()>),
}

/// Writes the log of one attempt of one build.
#[derive(Clone)]
pub struct LogSink {
    tx: mpsc::Sender<Msg>,
}

/// One row waiting to be inserted.
struct Row {
    step: String,
    stream: &'static str,
    data: Vec<u8>,
}

/// The writer task's state.
struct Writer {
    pool: PgPool,
    build_id: Uuid,
    attempt: i32,
    limit: usize,
    /// Output bytes (not the builder's own lines) kept so far.
    kept: usize,
    /// Output bytes dropped past the limit.
    dropped: u64,
    /// Whether the cut was announced.
    cut: bool,
    rows: Vec<Row>,
    pending: usize,
    /// The project's secrets.
    masker: Masker,
    /// The step of the last chunk.
    last_step: Option<String>,
}

impl Writer {
    /// A writer of one attempt of `build_id` that keeps at most `limit`
    /// bytes and masks what `masker` knows.
    fn new(pool: PgPool, build_id: Uuid, attempt: i32, limit: usize, masker: Masker) -> Self {
        Self {
            pool,
            build_id,
            attempt,
            limit,
            kept: 0,
            dropped: 0,
            cut: false,
            rows: Vec::new(),
            pending: 0,
            masker,
            last_step: None,
        }
    }

    fn push(&mut self, step: &str, stream: &'static str, data: &[u8]) {
        if let Some(last) = self.rows.last_mut()
            && last.step == step
            && last.stream == stream
            && last.data.len() + data.len() <= ROW_BYTES
        {
            last.data.extend_from_slice(data);
        } else {
            for part in data.chunks(ROW_BYTES) {
                self.rows.push(Row {
                    step: step.to_owned(),
                    stream,
                    data: part.to_vec(),
                });
            }
        }
        self.pending += data.len();
    }

    /// Takes a chunk: masks it (the end of an output chunk may wait for the
    /// next one of its stream), then keeps it.
    fn take(&mut self, step: String, stream: &'static str, data: Vec<u8>) {
        if self.step_changed(&step) {
            // Steps run one after the other: what an earlier one held back
            // will not be continued.
            self.release_held();
        }
        let data = if stream == "system" {
            self.masker.mask(&data)
        } else {
            self.masker.feed(&step, stream, &data)
        };
        if !data.is_empty() {
            self.keep(step, stream, data);
        }
    }

    /// Keeps a masked chunk, applying the cap to output (never to system lines).
    fn keep(&mut self, step: String, stream: &'static str, data: Vec<u8>) {
        if stream == "system" {
            self.push(&step, stream, &data);
            return;
        }
        let room = self.limit.saturating_sub(self.kept);
        let keep = data.len().min(room);
        if keep > 0 {
            self.push(&step, stream, &data[..keep]);
            self.kept += keep;
        }
        if keep < data.len() {
            self.dropped += (data.len() - keep) as u64;
            if self.cut {
                return;
            }
            self.cut = true;
            let notice = format!(
                "\n[gantry] the log of this build reached its limit of {}; further output is not stored (the steps still run and their exit codes decide)\n",
                human(self.limit as u64)
            );
            self.push(&step, "system", notice.as_bytes());
        }
    }

    async fn flush(&mut self) {
        if self.rows.is_empty() {
            return;
        }
        let rows = std::mem::take(&mut self.rows);
        self.pending = 0;
        let (mut steps, mut streams, mut data) = (Vec::new(), Vec::new(), Vec::new());
        for r in rows {
            steps.push(r.step);
            streams.push(r.stream);
            data.push(r.data);
        }
        // The database may be restarting: a few tries, then the lines are lost
        // (never the build).
        let stored = gantry_retry::Policy::LogWrite
            .retry("store log lines", || {
                sqlx::query!(
                    "INSERT INTO build_logs (build_id, attempt, step, stream, data)
                     SELECT $1, $2, s.step, s.stream, s.data
                     FROM unnest($3::text[], $4::text[], $5::bytea[]) WITH ORDINALITY AS s(step, stream, data, n)
                     ORDER BY s.n",
                    self.build_id,
                    self.attempt,
                    &steps,
                    &streams as &[&str],
                    &data,
                )
                .execute(&self.pool)
            })
            .await;
        if let Err(gave_up) = stored {
            tracing::warn!(build_id = %self.build_id, error = %gave_up.error, lines = steps.len(), "could not store log lines");
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut tick = tokio::time::interval(FLUSH_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(Msg::Chunk { step, stream, data }) => {
                        self.take(step, stream, data);
                        if self.pending >= BATCH_BYTES {
                            self.flush().await;
                        }
                    }
                    Some(Msg::Close(done)) => {
                        self.finish();
                        self.flush().await;
                        let _ = done.send(());
                    }
                    None => {
                        self.finish();
                        self.flush().await;
                        return;
                    }
                },
                _ = tick.tick() => self.flush().await,
            }
        }
    }

    /// Whether `step` is another step than the last chunk's.
    fn step_changed(&mut self, step: &str) -> bool {
        let changed = self.last_step.as_deref().is_some_and(|last| last != step);
        if self.last_step.as_deref() != Some(step) {
            self.last_step = Some(step.to_owned());
        }
        changed
    }

    /// Keeps what the masker held back: its stream has ended.
    fn release_held(&mut self) {
        for (step, stream, rest) in self.masker.finish() {
            if !rest.is_empty() {
                self.keep(step, stream, rest);
            }
        }
    }

    /// What the masker held back (the output has ended), then the closing
    /// line of a cut log, once.
    fn finish(&mut self) {
        self.release_held();
        if self.dropped > 0 {
            let line = format!(
                "[gantry] log cut: {} of output beyond the {} limit were not stored\n",
                human(self.dropped),
                human(self.limit as u64)
            );
            self.push("build", "system", line.as_bytes());
            self.dropped = 0;
        }
    }
}

/// `4 MiB`, `512 KiB`, `17 bytes`.
fn human(bytes: u64) -> String {
    const MIB: u64 = 1024 * 1024;
    if bytes >= MIB && bytes.is_multiple_of(MIB) {
        format!("{} MiB", bytes / MIB)
    } else if bytes >= MIB {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    } else if bytes >= 1024 {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} bytes")
    }
}

impl LogSink {
    /// A sink for one attempt of `build_id`, keeping at most `limit` bytes
    /// of output, with `secrets` masked. Starts its writer task.
    pub fn new<'a>(
        pool: PgPool,
        build_id: Uuid,
        attempt: i32,
        limit: usize,
        secrets: impl IntoIterator<Item = &'a str>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let masker = Masker::new(secrets);
        tokio::spawn(Writer::new(pool, build_id, attempt, limit, masker).run(rx));
        Self { tx }
    }

    /// Appends a chunk of `stream` ("stdout", "stderr"; "system" for the builder's own lines).
    pub async fn write(&self, step: &str, stream: &'static str, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let _ = self
            .tx
            .send(Msg::Chunk {
                step: step.to_owned(),
                stream,
                data: data.to_vec(),
            })
            .await;
    }

    /// A line from the builder itself.
    pub async fn system(&self, step: &str, line: impl AsRef<str>) {
        let mut text = line.as_ref().to_owned();
        text.push('\n');
        self.write(step, "system", text.as_bytes()).await;
    }

    /// Stores everything written so far (and the cut notice, if any); call
    /// before recording the verdict.
    pub async fn close(&self) {
        let (done, wait) = oneshot::channel();
        if self.tx.send(Msg::Close(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn writer(limit: usize) -> Writer {
        Writer::new(
            PgPool::connect_lazy("postgres://nowhere/none").expect("lazy pool"),
            Uuid::nil(),
            1,
            limit,
            Masker::new(["s3cr3t-value"]),
        )
    }

    #[tokio::test]
    async fn chunks_merge_into_rows_and_output_is_cut_at_the_limit() {
        let mut w = writer(100);
        for _ in 0..30 {
            w.take("unit".into(), "stdout", b"0123".to_vec());
        }
        // 100 bytes kept in one row, the cut notice, and 20 bytes counted.
        assert_eq!(w.rows[0].data.len(), 100);
        assert_eq!(w.rows[1].stream, "system");
        assert!(
            String::from_utf8_lossy(&w.rows[1].data).contains("limit of 100 bytes"),
            "{:?}",
            String::from_utf8_lossy(&w.rows[1].data)
        );
        assert_eq!(w.dropped, 20);
        // The builder's own lines still go in.
        w.take("unit".into(), "system", b"step exited with 3\n".to_vec());
        w.finish();
        let last = String::from_utf8_lossy(&w.rows.last().expect("row").data).into_owned();
        assert!(last.contains("log cut: 20 bytes"), "{last}");
        // The notice and the builder's line share a row (same step and stream).
        assert_eq!(w.rows.len(), 3);
        assert!(String::from_utf8_lossy(&w.rows[1].data).ends_with("step exited with 3\n"));
    }

    #[tokio::test]
    async fn a_big_chunk_becomes_rows_of_at_most_row_bytes() {
        let mut w = writer(10 * ROW_BYTES);
        w.take("unit".into(), "stderr", vec![b'x'; 2 * ROW_BYTES + 5]);
        let sizes: Vec<usize> = w.rows.iter().map(|r| r.data.len()).collect();
        assert_eq!(sizes, vec![ROW_BYTES, ROW_BYTES, 5]);
        w.take("other".into(), "stderr", b"y".to_vec());
        assert_eq!(w.rows.len(), 4);
    }

    #[tokio::test]
    async fn secrets_are_masked_before_anything_is_kept() {
        let mut w = writer(1000);
        w.take("unit".into(), "stdout", b"key: s3cr3t-".to_vec());
        w.take("unit".into(), "stdout", b"value\nend s3".to_vec());
        w.take("unit".into(), "system", b"$ echo s3cr3t-value\n".to_vec());
        w.finish();
        let text: String = w
            .rows
            .iter()
            .map(|r| String::from_utf8_lossy(&r.data).into_owned())
            .collect();
        assert!(!text.contains("s3cr3t-value"), "{text}");
        assert!(text.contains("key: [MASKED]\nend "), "{text}");
        assert!(text.contains("$ echo [MASKED]"), "{text}");
        // What was held back as a possible secret comes out at the end.
        assert!(text.ends_with("s3"), "{text}");
    }

    #[test]
    fn sizes_read_well() {
        assert_eq!(human(4 * 1024 * 1024), "4 MiB");
        assert_eq!(human(512 * 1024), "512 KiB");
        assert_eq!(human(17), "17 bytes");
    }
}
