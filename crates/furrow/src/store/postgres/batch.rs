//! Micro-batching of the per-handshake queries (the device lookup, the
//! cluster claim and its reads), the way the writer group-commits
//! telemetry.
//!
//! On PostgreSQL most of a small statement's cost is fixed: parse of the
//! Bind, executor start-up, locks, the commit. A reconnecting fleet sends
//! thousands of handshakes a second, each with the same few statements;
//! answered one by one they kept PostgreSQL busy at about 400 us of CPU per
//! handshake (20,000 devices, two gateways, a profile of the burst). A
//! [`Batcher`] takes the requests that arrived while its previous
//! statements ran and answers them with one statement: at low load a
//! request runs at once, alone (no added delay); under a burst, batches
//! grow by themselves.

use std::future::Future;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::store::StoreError;

/// Requests a batch takes at most.
pub(crate) const MAX_BATCH: usize = 256;

/// Requests waiting for a batch, at most (callers wait for room).
const QUEUE: usize = 4 * MAX_BATCH;

type Reply<V> = oneshot::Sender<Result<V, StoreError>>;

/// Answers requests of type `R` in batches, with at most `parallel`
/// batches running at once. Cheap to clone; the batching task ends when
/// the last clone is dropped.
pub(crate) struct Batcher<R, V> {
    tx: mpsc::Sender<(R, Reply<V>)>,
}

impl<R, V> Clone for Batcher<R, V> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
        }
    }
}

impl<R: Send + 'static, V: Send + 'static> Batcher<R, V> {
    /// Starts the batching task on the current runtime. `run` answers a
    /// batch: one result per request, in order, or one error for all.
    pub(crate) fn start<F, Fut>(parallel: usize, run: F) -> Self
    where
        F: Fn(Vec<R>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Vec<V>, StoreError>> + Send + 'static,
    {
        let (tx, mut rx) = mpsc::channel::<(R, Reply<V>)>(QUEUE);
        let run = Arc::new(run);
        let slots = Arc::new(Semaphore::new(parallel.max(1)));
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                // While every slot is busy, requests gather in the queue:
                // that is what makes a batch under load.
                let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                    return;
                };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(req) => batch.push(req),
                        Err(_) => break,
                    }
                }
                metrics::histogram!("furrow_store_handshake_batch_rows").record(batch.len() as f64);
                let run = Arc::clone(&run);
                tokio::spawn(async move {
                    let (reqs, replies): (Vec<R>, Vec<Reply<V>>) = batch.into_iter().unzip();
                    let n = reqs.len();
                    match run(reqs).await {
                        Ok(values) if values.len() == n => {
                            for (reply, v) in replies.into_iter().zip(values) {
                                // A caller that gave up (its handshake timed
                                // out) has dropped its receiver: nothing to do.
                                let _ = reply.send(Ok(v));
                            }
                        }
                        Ok(values) => {
                            let e = StoreError::Task(format!(
                                "a batch of {n} answered {} results",
                                values.len()
                            ));
                            answer_all(replies, e);
                        }
                        Err(e) => answer_all(replies, e),
                    }
                    drop(slot);
                });
            }
        });
        Self { tx }
    }

    /// Queues `req` and waits for its answer.
    pub(crate) async fn call(&self, req: R) -> Result<V, StoreError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((req, reply))
            .await
            .map_err(|_| StoreError::Task("the batching task has ended".into()))?;
        rx.await
            .map_err(|_| StoreError::Task("a batch was dropped unanswered".into()))?
    }
}

/// One batch's failure, given to each of its callers.
fn answer_all<V>(replies: Vec<Reply<V>>, e: StoreError) {
    let shared = Arc::new(e);
    for reply in replies {
        let _ = reply.send(Err(StoreError::Batch(Arc::clone(&shared))));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn a_burst_is_answered_in_batches_each_request_with_its_own_answer() {
        let batches = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&batches);
        let b: Batcher<u32, u32> = Batcher::start(1, move |reqs: Vec<u32>| {
            counted.fetch_add(1, Ordering::Relaxed);
            async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                Ok(reqs.iter().map(|r| r * 2).collect())
            }
        });
        let calls: Vec<_> = (0..100u32)
            .map(|i| {
                let b = b.clone();
                tokio::spawn(async move { (i, b.call(i).await) })
            })
            .collect();
        for c in calls {
            let (i, r) = c.await.expect("join");
            assert_eq!(r.expect("answer"), i * 2);
        }
        let n = batches.load(Ordering::Relaxed);
        assert!(
            (1..=10).contains(&n),
            "100 requests at once took {n} batches"
        );
    }

    #[tokio::test]
    async fn a_failed_batch_fails_each_caller_and_the_next_batch_runs() {
        let b: Batcher<u32, u32> = Batcher::start(2, |reqs: Vec<u32>| async move {
            if reqs.contains(&13) {
                return Err(StoreError::Pool("unlucky".into()));
            }
            // A wrong count is an error too, never a misdelivered answer.
            if reqs.contains(&7) {
                return Ok(Vec::new());
            }
            Ok(reqs)
        });
        let e = b.call(13).await.expect_err("failed batch");
        assert!(e.to_string().contains("unlucky"), "{e}");
        assert!(b.call(7).await.is_err());
        assert_eq!(b.call(5).await.expect("next batch"), 5);
    }
}
