//! Backpressure for streamed responses. Every stream's events go through a counted
//! channel: events queued by the stream task, events taken by the HTTP body (which
//! hyper polls only as fast as the client reads). When a client stops reading, the
//! backlog grows past [`PAUSE_AFTER`] and its sequences stop being decoded (the engine
//! skips them, holding their KV blocks); once the client has read nothing for the
//! server's stall timeout, the stream ends and its sequences are dropped.

use axum::response::sse::Event as SseEvent;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::error::SendError;
use tokio::sync::mpsc::{unbounded_channel, UnboundedSender};
use tokio::time::Instant;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt};

/// Events a client may leave unread before its generation pauses (a few dozen tokens:
/// enough to ride out a slow network, far from what a long answer buffers).
pub(crate) const PAUSE_AFTER: usize = 64;

/// One stream's counters, shared by its sender, its body and the engine's flag.
struct Counters {
    queued: AtomicUsize,
    delivered: AtomicUsize,
    started: Instant,
    /// Milliseconds since `started` at the last delivery.
    last_delivery_ms: AtomicU64,
    /// Read by the engine: skip this stream's sequences while set.
    backed_up: Arc<AtomicBool>,
}

impl Counters {
    fn update(&self) {
        let backlog = self
            .queued
            .load(Ordering::SeqCst)
            .saturating_sub(self.delivered.load(Ordering::SeqCst));
        self.backed_up
            .store(backlog >= PAUSE_AFTER, Ordering::SeqCst);
    }
}

/// The sending half of a stream's events.
pub(crate) struct FlowSender {
    tx: UnboundedSender<SseEvent>,
    counters: Arc<Counters>,
    stall_timeout: Duration,
}

impl FlowSender {
    pub fn send(&self, ev: SseEvent) -> Result<(), SendError<SseEvent>> {
        self.counters.queued.fetch_add(1, Ordering::SeqCst);
        self.counters.update();
        self.tx.send(ev)
    }

    /// Resolves when the response body is gone (the client hung up).
    pub async fn closed(&self) {
        self.tx.closed().await
    }

    /// Resolves once the client has left a backlog unread for the stall timeout.
    pub async fn stalled(&self) {
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let c = &self.counters;
            if !c.backed_up.load(Ordering::SeqCst) {
                continue;
            }
            let since_ms = c.started.elapsed().as_millis() as u64;
            let last = c.last_delivery_ms.load(Ordering::SeqCst);
            if Duration::from_millis(since_ms.saturating_sub(last)) >= self.stall_timeout {
                return;
            }
        }
    }
}

/// A stream's channel: the sender for its stream task, the body for its response, and
/// the flag for its engine requests.
pub(crate) fn channel(
    stall_timeout: Duration,
) -> (
    FlowSender,
    impl Stream<Item = Result<SseEvent, Infallible>>,
    Arc<AtomicBool>,
) {
    let (tx, rx) = unbounded_channel();
    let backed_up = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters {
        queued: AtomicUsize::new(0),
        delivered: AtomicUsize::new(0),
        started: Instant::now(),
        last_delivery_ms: AtomicU64::new(0),
        backed_up: backed_up.clone(),
    });
    let body_counters = counters.clone();
    let body = UnboundedReceiverStream::new(rx).map(move |ev| {
        let c = &body_counters;
        c.delivered.fetch_add(1, Ordering::SeqCst);
        c.last_delivery_ms
            .store(c.started.elapsed().as_millis() as u64, Ordering::SeqCst);
        c.update();
        Ok(ev)
    });
    let sender = FlowSender {
        tx,
        counters,
        stall_timeout,
    };
    (sender, body, backed_up)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unread_backlog_raises_the_flag_and_reading_lowers_it() {
        let (tx, body, flag) = channel(Duration::from_secs(60));
        let mut body = Box::pin(body);
        for _ in 0..PAUSE_AFTER - 1 {
            assert!(tx.send(SseEvent::default().data("x")).is_ok());
        }
        assert!(!flag.load(Ordering::SeqCst));
        assert!(tx.send(SseEvent::default().data("x")).is_ok());
        assert!(flag.load(Ordering::SeqCst));
        assert!(body.next().await.is_some());
        assert!(!flag.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_reads_nothing_stalls_after_the_timeout() {
        let (tx, _body, _flag) = channel(Duration::from_secs(3));
        for _ in 0..PAUSE_AFTER {
            assert!(tx.send(SseEvent::default().data("x")).is_ok());
        }
        let started = tokio::time::Instant::now();
        tx.stalled().await;
        assert!(started.elapsed() >= Duration::from_millis(2500));
    }
}
