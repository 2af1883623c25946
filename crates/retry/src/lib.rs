//! Gantry's one retry policy, configured here and nowhere else: capped
//! exponential backoff with jitter (`backon`), one [`Policy`] per kind of
//! work, each a named set of numbers. An operation is retried with
//! [`Policy::retry`]; loops that must also wait on their own shutdown signal
//! take the delays from [`Policy::delays`] (an iterator that ends when the
//! policy gives up); the notifier, which keeps a call's attempts in its
//! table, takes the delay of its n-th attempt from
//! [`Policy::delay_of_attempt`].
//!
//! Jitter makes each delay between one and two times the nominal one, so
//! that replicas retrying the same outage do not retry in step.

use std::future::Future;
use std::time::Duration;

use backon::BackoffBuilder as _;

/// How a retried operation ended when its policy gave up.
#[derive(Debug)]
pub struct GaveUp<E> {
    /// The last try's error.
    pub error: E,
    /// How many tries were made.
    pub tries: u32,
}

/// How a kind of work is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// A bus connection (consumer or outbox relay) that broke: forever,
    /// 100 ms doubling to 5 s.
    Reconnect,
    /// A handler's passing failure (the database restarting), retried in
    /// place before the message goes back to the queue: 200 ms doubling to
    /// 15 s, for at most 5 minutes.
    InPlace,
    /// Recording the end of a build or deployment while the database is
    /// away: 250 ms doubling to 5 s, for at most 5 minutes.
    Record,
    /// Pushing a tested image: 1 s doubling to 30 s, the attempts given.
    Push(u32),
    /// Pulling an image to deploy: 1 s doubling to 8 s, the attempts given.
    Pull(u32),
    /// Storing a batch of log lines: 200 ms doubling to 2 s, 4 retries.
    LogWrite,
    /// Removing a container the engine is busy with: 200 ms doubling to
    /// 2 s, 3 retries.
    Remove,
    /// An outgoing call to a forge or a chat server: 2 s doubling to 10
    /// minutes, the attempts given.
    Outbound(u32),
}

impl Policy {
    fn builder(self) -> backon::ExponentialBuilder {
        let (first, max, times, total) = match self {
            Policy::Reconnect => (100, 5_000, None, None),
            Policy::InPlace => (200, 15_000, None, Some(300)),
            Policy::Record => (250, 5_000, None, Some(300)),
            Policy::Push(n) => (1_000, 30_000, Some(n.saturating_sub(1)), None),
            Policy::Pull(n) => (1_000, 8_000, Some(n.saturating_sub(1)), None),
            Policy::LogWrite => (200, 2_000, Some(4), None),
            Policy::Remove => (200, 2_000, Some(3), None),
            Policy::Outbound(n) => (2_000, 600_000, Some(n.saturating_sub(1)), None),
        };
        let builder = backon::ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(first))
            .with_max_delay(Duration::from_millis(max))
            .with_factor(2.0)
            .with_jitter()
            .with_total_delay(total.map(Duration::from_secs));
        match times {
            Some(n) => builder.with_max_times(n as usize),
            None => builder.without_max_times(),
        }
    }

    /// The delays before each retry; the iterator ends when the policy
    /// gives up (`None`: no more tries).
    pub fn delays(self) -> impl Iterator<Item = Duration> + Send {
        self.builder().build()
    }

    /// Runs `op` until it succeeds, waiting between tries as the policy says
    /// and logging each failure (a warning naming `what`); when the policy
    /// gives up, the last error and the number of tries.
    pub async fn retry<T, E, F, Fut>(self, what: &str, mut op: F) -> Result<T, GaveUp<E>>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        let mut delays = self.delays();
        let mut tries = 0;
        loop {
            tries += 1;
            match op().await {
                Ok(value) => return Ok(value),
                Err(error) => match delays.next() {
                    Some(pause) => {
                        tracing::warn!(
                            error = format!("{error:#}"),
                            tries,
                            retry_in_ms = pause.as_millis() as u64,
                            "cannot {what} yet; retrying"
                        );
                        tokio::time::sleep(pause).await;
                    }
                    None => return Err(GaveUp { error, tries }),
                },
            }
        }
    }

    /// The delay after the `attempt`-th failed attempt (1-based), or `None`
    /// when the policy gives up after it.
    pub fn delay_of_attempt(self, attempt: u32) -> Option<Duration> {
        self.delays().nth(attempt.saturating_sub(1) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retry_stops_at_success_or_when_the_policy_gives_up() {
        let mut calls = 0;
        let ok: Result<u32, GaveUp<String>> = Policy::Remove
            .retry("count", || {
                calls += 1;
                let n = calls;
                async move {
                    if n < 3 {
                        Err(format!("try {n}"))
                    } else {
                        Ok(n)
                    }
                }
            })
            .await;
        assert_eq!(ok.ok(), Some(3));
        let failed = Policy::Remove
            .retry("fail", || async { Err::<(), _>("never") })
            .await
            .expect_err("gives up");
        assert_eq!(
            (failed.error, failed.tries),
            ("never", 4),
            "1 try + 3 retries"
        );
    }

    #[test]
    fn delays_grow_with_jitter_up_to_the_cap() {
        let d: Vec<Duration> = Policy::Push(5).delays().collect();
        assert_eq!(d.len(), 4, "5 attempts: 4 waits");
        for (i, delay) in d.iter().enumerate() {
            let nominal = Duration::from_secs(1 << i);
            assert!(*delay >= nominal && *delay <= nominal * 2, "{i}: {delay:?}");
        }
        let reconnect: Vec<Duration> = Policy::Reconnect.delays().take(20).collect();
        assert_eq!(reconnect.len(), 20, "reconnects go on");
        assert!(reconnect.iter().all(|d| *d <= Duration::from_secs(10)));
    }

    #[test]
    fn bounded_policies_give_up() {
        assert_eq!(Policy::Push(1).delays().count(), 0);
        assert_eq!(Policy::Remove.delays().count(), 3);
        let total: Duration = Policy::InPlace.delays().sum();
        assert!(total <= Duration::from_secs(300), "{total:?}");
        assert!(total >= Duration::from_secs(150), "{total:?}");
        assert!(Policy::Outbound(15).delay_of_attempt(14).is_some());
        assert!(Policy::Outbound(15).delay_of_attempt(15).is_none());
        let late = Policy::Outbound(15)
            .delay_of_attempt(14)
            .unwrap_or_default();
        assert!(late >= Duration::from_secs(600) && late <= Duration::from_secs(1200));
    }
}
