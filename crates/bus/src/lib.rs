//! The event bus: RabbitMQ through lapin.
//!
//! Topology (declared idempotently by every service on every (re)connect):
//! - `gantry.events`: durable topic exchange; routing key = event type
//!   (`pipeline.requested`, `build.succeeded`, ...).
//! - one durable quorum queue per consuming service (competing consumers when
//!   a service runs several replicas), dead-lettering to `gantry.dead-letter`
//!   after [`DELIVERY_LIMIT`] deliveries or on reject.
//! - `gantry.dead-letter`: fanout exchange and durable queue holding what no
//!   service could handle, for an operator to inspect.
//!
//! Publishing only happens through the transactional outbox ([`enqueue`] in
//! the caller's transaction, [`relay`] with publisher confirms). Consumers
//! ([`consume`]) ack manually after the handler committed, with a bounded
//! prefetch; handlers deduplicate by event id ([`gantry_store::first_delivery`]).
//!
//! lapin does not recover reliably from a broker restart, so every loop here
//! supervises its own connection: any error, a closed consumer stream or a
//! connection that is no longer `connected` drops everything and reconnects
//! with capped exponential backoff.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use futures::StreamExt;
use gantry_proto::v1::Event;
use gantry_retry::Policy;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use prost::Message as _;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

pub use tokio_util::sync::CancellationToken as Shutdown;

/// The topic exchange every event is published to.
pub const EXCHANGE: &str = "gantry.events";
/// Where rejected or too-often-redelivered messages go.
pub const DEAD_LETTER_EXCHANGE: &str = "gantry.dead-letter";
/// The queue bound to [`DEAD_LETTER_EXCHANGE`].
pub const DEAD_LETTER_QUEUE: &str = "gantry.dead-letter";
/// Deliveries of one message before the broker dead-letters it.
pub const DELIVERY_LIMIT: i64 = 10;
/// How long a connection attempt may take (lapin can hang when the broker is down).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a loop checks that its connection is still up, even when idle.
const LIVENESS_CHECK: Duration = Duration::from_secs(1);
/// How often the relay looks at the outbox without being woken.
const RELAY_POLL: Duration = Duration::from_millis(500);
/// Outbox rows relayed per transaction.
const RELAY_BATCH: i64 = 200;

/// Whether a bus loop currently holds a working broker connection (readiness).
#[derive(Clone, Default, Debug)]
pub struct Link(Arc<AtomicBool>);

impl Link {
    pub fn is_up(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
    fn set(&self, up: bool) {
        self.0.store(up, Ordering::Relaxed);
    }
}

/// A durable queue of one consuming service and the routing keys it follows.
#[derive(Clone, Copy, Debug)]
pub struct QueueDef {
    pub name: &'static str,
    pub bindings: &'static [&'static str],
}

/// The queues of the consuming services. Every connection declares all of
/// them, so an event published before its consumer first started is kept.
pub mod queues {
    use super::QueueDef;
    use gantry_proto::routing::*;

    /// Work queue of the builder replicas (competing consumers).
    pub const BUILDER: QueueDef = QueueDef {
        name: "builder",
        bindings: &[PIPELINE_REQUESTED, STACK_RUN_REQUESTED],
    };
    pub const REGISTRY_PUBLISHER: QueueDef = QueueDef {
        name: "registry-publisher",
        bindings: &[BUILD_SUCCEEDED],
    };
    pub const DEPLOYER: QueueDef = QueueDef {
        name: "deployer",
        bindings: &[
            IMAGE_PUBLISHED,
            PIPELINE_REQUESTED,
            STACK_RUN_STARTED,
            STACK_RUN_PASSED,
            STACK_RUN_FAILED,
        ],
    };
    /// The notifier follows every event.
    pub const NOTIFIER: QueueDef = QueueDef {
        name: "notifier",
        bindings: &["#"],
    };
    pub const ALL: [QueueDef; 4] = [BUILDER, REGISTRY_PUBLISHER, DEPLOYER, NOTIFIER];
}

/// What a handler made of an event.
#[derive(Debug)]
pub enum Outcome {
    /// Handled (or already handled before): ack.
    Done,
    /// A passing failure (database down, ...): requeue after a pause.
    Retry(anyhow::Error),
    /// The event can never be handled: dead-letter it.
    Reject(anyhow::Error),
}

/// Handles the events of one queue.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, event: Event) -> impl Future<Output = Outcome> + Send;
}

async fn connect(url: &str) -> anyhow::Result<Connection> {
    let conn = tokio::time::timeout(
        CONNECT_TIMEOUT,
        Connection::connect(url, ConnectionProperties::default()),
    )
    .await
    .context("timed out connecting to the broker")?
    .context("connecting to the broker")?;
    Ok(conn)
}

fn sstr(s: &str) -> ShortString {
    ShortString::from(s.to_owned())
}

async fn declare_exchanges(ch: &lapin::Channel) -> anyhow::Result<()> {
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.exchange_declare(
        sstr(EXCHANGE),
        ExchangeKind::Topic,
        durable,
        FieldTable::default(),
    )
    .await?;
    ch.exchange_declare(
        sstr(DEAD_LETTER_EXCHANGE),
        ExchangeKind::Fanout,
        durable,
        FieldTable::default(),
    )
    .await?;
    ch.queue_declare(
        sstr(DEAD_LETTER_QUEUE),
        QueueDeclareOptions::durable(),
        quorum_args(false),
    )
    .await?;
    ch.queue_bind(
        sstr(DEAD_LETTER_QUEUE),
        sstr(DEAD_LETTER_EXCHANGE),
        sstr(""),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

fn quorum_args(dead_letter: bool) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        sstr("x-queue-type"),
        AMQPValue::LongString(LongString::from("quorum")),
    );
    if dead_letter {
        args.insert(
            sstr("x-dead-letter-exchange"),
            AMQPValue::LongString(LongString::from(DEAD_LETTER_EXCHANGE)),
        );
        args.insert(
            sstr("x-delivery-limit"),
            AMQPValue::LongLongInt(DELIVERY_LIMIT),
        );
    }
    args
}

/// Declares the exchanges and every service queue with its bindings.
pub async fn declare(ch: &lapin::Channel) -> anyhow::Result<()> {
    declare_exchanges(ch).await?;
    for q in queues::ALL {
        ch.queue_declare(
            sstr(q.name),
            QueueDeclareOptions::durable(),
            quorum_args(true),
        )
        .await?;
        for key in q.bindings {
            ch.queue_bind(
                sstr(q.name),
                sstr(EXCHANGE),
                sstr(key),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        }
    }
    Ok(())
}

/// Runs `f` again and again, waiting as [`Policy::Reconnect`] says, until
/// shutdown. `f` returns `Ok(())` only when it stopped because of shutdown.
async fn supervise<F, Fut>(what: &str, link: &Link, shutdown: &CancellationToken, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut delays = Policy::Reconnect.delays();
    while !shutdown.is_cancelled() {
        let started = tokio::time::Instant::now();
        let result = f().await;
        link.set(false);
        match result {
            Ok(()) => return,
            Err(e) => {
                // A connection that lived a while was healthy: start over quickly.
                if started.elapsed() > Duration::from_secs(10) {
                    delays = Policy::Reconnect.delays();
                }
                let backoff = delays.next().unwrap_or(Duration::from_secs(5));
                tracing::warn!(
                    loop_name = what,
                    error = format!("{e:#}"),
                    retry_in_ms = backoff.as_millis() as u64,
                    "broker connection lost; reconnecting"
                );
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
        }
    }
}

/// Consumes `queue` with `handler` until `shutdown`, reconnecting by itself.
/// `prefetch` bounds the unacknowledged deliveries held (and so the concurrency).
pub async fn consume<H: Handler>(
    url: String,
    queue: QueueDef,
    prefetch: u16,
    handler: Arc<H>,
    link: Link,
    shutdown: CancellationToken,
) {
    let what = format!("consumer {}", queue.name);
    supervise(&what, &link, &shutdown, || {
        consume_once(&url, queue, prefetch, handler.clone(), &link, &shutdown)
    })
    .await;
}

async fn consume_once<H: Handler>(
    url: &str,
    queue: QueueDef,
    prefetch: u16,
    handler: Arc<H>,
    link: &Link,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let conn = connect(url).await?;
    let ch = conn.create_channel().await?;
    declare(&ch).await?;
    ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            sstr(queue.name),
            sstr(""),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    link.set(true);
    tracing::info!(queue = queue.name, prefetch, "consuming");
    let mut check = tokio::time::interval(LIVENESS_CHECK);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = conn.close(200, sstr("shutdown")).await;
                return Ok(());
            }
            _ = check.tick() => {
                anyhow::ensure!(conn.status().connected(), "connection is no longer connected");
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    tokio::spawn(handle_delivery(handler.clone(), delivery));
                }
                Some(Err(e)) => return Err(e).context("consumer stream failed"),
                None => anyhow::bail!("consumer stream ended"),
            }
        }
    }
}

fn header_str<'a>(props: &'a BasicProperties, key: &str) -> Option<&'a str> {
    match props.headers().as_ref()?.inner().get(key)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

async fn handle_delivery<H: Handler>(handler: Arc<H>, delivery: lapin::message::Delivery) {
    let routing_key = delivery.routing_key.as_str().to_owned();
    let span = tracing::info_span!(
        "handle_event",
        otel.kind = "consumer",
        routing_key = %routing_key,
        event_id = tracing::field::Empty,
        pipeline_id = tracing::field::Empty,
        redelivered = delivery.redelivered,
    );
    if let Some(tp) = header_str(&delivery.properties, "traceparent") {
        gantry_telemetry::set_parent(&span, tp);
    }
    let settle = async move {
        let outcome = match Event::decode(delivery.data.as_slice()) {
            Ok(event) => {
                let span = tracing::Span::current();
                span.record("event_id", event.id.as_str());
                span.record("pipeline_id", event.pipeline_id.as_str());
                handle_with_retries(handler.as_ref(), event).await
            }
            Err(e) => {
                Outcome::Reject(anyhow::Error::new(e).context("event is not a gantry.v1.Event"))
            }
        };
        let settled = match outcome {
            Outcome::Done => delivery.acker.ack(BasicAckOptions::default()).await,
            Outcome::Retry(e) => {
                tracing::warn!(
                    error = format!("{e:#}"),
                    "event handling kept failing; requeueing"
                );
                delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await
            }
            Outcome::Reject(e) => {
                tracing::error!(
                    error = format!("{e:#}"),
                    "event cannot be handled; dead-lettering"
                );
                delivery
                    .acker
                    .reject(BasicRejectOptions { requeue: false })
                    .await
            }
        };
        if let Err(e) = settled {
            // The connection went away: the broker redelivers, the handler is idempotent.
            tracing::warn!(error = %e, "could not settle delivery; it will be redelivered");
        }
    };
    settle.instrument(span).await;
}

/// Runs the handler, retrying passing failures in place as
/// [`Policy::InPlace`] says (about 5 minutes: a database restart, say)
/// before the delivery goes back to the queue, where each return counts
/// toward [`DELIVERY_LIMIT`]. Well under RabbitMQ's default 30-minute
/// consumer timeout.
async fn handle_with_retries<H: Handler>(handler: &H, event: Event) -> Outcome {
    let mut delays = Policy::InPlace.delays();
    loop {
        match handler.handle(event.clone()).await {
            Outcome::Retry(e) => match delays.next() {
                Some(backoff) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        retry_in_ms = backoff.as_millis() as u64,
                        "event handling failed; retrying"
                    );
                    tokio::time::sleep(backoff).await;
                }
                None => return Outcome::Retry(e),
            },
            other => return other,
        }
    }
}

/// Writes `event` to the outbox inside `tx`, with the current trace context.
pub async fn enqueue(tx: &mut Transaction<'_, Postgres>, event: &Event) -> sqlx::Result<()> {
    let tp = gantry_telemetry::current_traceparent();
    enqueue_traced(tx, event, tp.as_deref()).await
}

/// Writes `event` to the outbox inside `tx`, with the given trace context.
pub async fn enqueue_traced(
    tx: &mut Transaction<'_, Postgres>,
    event: &Event,
    traceparent: Option<&str>,
) -> sqlx::Result<()> {
    let key = event
        .routing_key()
        .ok_or_else(|| sqlx::Error::Protocol("event without payload".into()))?;
    gantry_store::outbox_insert(
        tx,
        &event.id,
        key,
        &event.pipeline_id,
        &event.encode_to_vec(),
        traceparent,
    )
    .await
}

/// Relays the outbox of `pool`'s schema to the exchange with publisher
/// confirms until `shutdown`; a row is deleted only once the broker confirmed
/// it. `wake` lets writers skip the poll interval.
pub async fn relay(
    url: String,
    pool: PgPool,
    wake: Arc<Notify>,
    link: Link,
    shutdown: CancellationToken,
) {
    supervise("outbox relay", &link, &shutdown, || {
        relay_once(&url, &pool, &wake, &link, &shutdown)
    })
    .await;
}

async fn relay_once(
    url: &str,
    pool: &PgPool,
    wake: &Notify,
    link: &Link,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let conn = connect(url).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    declare(&ch).await?;
    link.set(true);
    loop {
        anyhow::ensure!(
            conn.status().connected(),
            "connection is no longer connected"
        );
        while relay_batch(&ch, pool).await? {}
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = conn.close(200, sstr("shutdown")).await;
                return Ok(());
            }
            _ = wake.notified() => {}
            _ = tokio::time::sleep(RELAY_POLL) => {}
        }
    }
}

/// Relays one batch; `true` if there may be more.
async fn relay_batch(ch: &lapin::Channel, pool: &PgPool) -> anyhow::Result<bool> {
    // Database errors are not the broker's fault: keep the connection and
    // try again at the next poll.
    let db_down = |e: sqlx::Error| {
        tracing::warn!(error = %e, "outbox relay cannot use the database");
        Ok(false)
    };
    let mut tx = match pool.begin().await {
        Ok(tx) => tx,
        Err(e) => return db_down(e),
    };
    let rows = match gantry_store::outbox_lock_batch(&mut tx, RELAY_BATCH).await {
        Ok(rows) => rows,
        Err(e) => return db_down(e),
    };
    if rows.is_empty() {
        return Ok(false);
    }
    let mut confirms = Vec::with_capacity(rows.len());
    for row in &rows {
        let mut headers = FieldTable::default();
        if let Some(tp) = &row.traceparent {
            headers.insert(
                sstr("traceparent"),
                AMQPValue::LongString(LongString::from(tp.as_str())),
            );
        }
        let props = BasicProperties::default()
            .with_message_id(sstr(&row.event_id))
            .with_correlation_id(sstr(&row.pipeline_id))
            .with_type(sstr(&row.routing_key))
            .with_content_type(sstr("application/x-protobuf"))
            .with_delivery_mode(2)
            .with_headers(headers);
        let confirm = ch
            .basic_publish(
                sstr(EXCHANGE),
                sstr(&row.routing_key),
                BasicPublishOptions::default(),
                &row.payload,
                props,
            )
            .await?;
        confirms.push(confirm);
    }
    for (row, confirm) in rows.iter().zip(confirms) {
        match confirm.await? {
            Confirmation::Ack(_) => {}
            other => anyhow::bail!("broker did not confirm event {}: {other:?}", row.event_id),
        }
    }
    // Should this fail, the rows are relayed again later: consumers are
    // idempotent by event id.
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    if let Err(e) = gantry_store::outbox_delete(&mut tx, &seqs).await {
        return db_down(e);
    }
    if let Err(e) = tx.commit().await {
        return db_down(e);
    }
    tracing::debug!(count = rows.len(), "relayed outbox events");
    Ok(rows.len() as i64 == RELAY_BATCH)
}
