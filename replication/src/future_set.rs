//! [`FutureSet`]: the futures one task runs side by side (its requests' I/O), polled as a
//! stream of their outputs, without waking that task when nothing finished.
//!
//! `FuturesUnordered` wakes its own task and returns `Pending` once one call has made as
//! many polls as it holds futures (its guard against starving other tasks). With one
//! request in flight that is every new request: the task is woken at once for nothing,
//! and tokio runs such a task as one that yielded, which also wakes an idle worker thread
//! (a `futex` call, and a sleep again). Here the set also holds one future that never
//! finishes and is never woken (the anchor), so a call reaches that count only when it
//! polls some future twice: one woken again during the call, by itself or by another
//! thread. A future that wakes itself on every poll is polled twice per call, then the set
//! yields.

use std::future::{pending, Future, Pending};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use futures_util::future::Either;
use futures_util::stream::{FuturesUnordered, Stream, StreamExt};

/// Futures run by one task, yielding their outputs as they finish (see the module doc).
pub struct FutureSet<F: Future> {
    /// The futures, and one that never finishes (the anchor).
    inner: FuturesUnordered<Either<F, Pending<F::Output>>>,
}

impl<F: Future> FutureSet<F> {
    pub fn new() -> Self {
        let mut inner = FuturesUnordered::new();
        inner.push(Either::Right(pending()));
        // Poll the anchor now, so that it is never among the futures a call polls.
        let _ = inner.poll_next_unpin(&mut Context::from_waker(Waker::noop()));
        FutureSet { inner }
    }

    pub fn push(&self, future: F) {
        self.inner.push(Either::Left(future));
    }

    /// How many futures have not finished.
    pub fn len(&self) -> usize {
        self.inner.len() - 1
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<F: Future> Default for FutureSet<F> {
    fn default() -> Self {
        Self::new()
    }
}

impl<F: Future> Stream for FutureSet<F> {
    type Item = F::Output;

    /// The next output; `Ready(None)` when the set is empty, as `FuturesUnordered` gives.
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<F::Output>> {
        if self.is_empty() {
            return Poll::Ready(None);
        }
        // The anchor never finishes, so the inner set never ends while it is in it.
        self.inner.poll_next_unpin(cx)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.len(), Some(self.len()))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    use super::*;

    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn polling_a_pending_future_does_not_wake_the_task() {
        let counter = Arc::new(CountingWaker::default());
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let mut set = FutureSet::new();
        assert!(set.poll_next_unpin(&mut cx).is_ready(), "empty: the end");
        for round in 1..=3u8 {
            let (tx, rx) = tokio::sync::oneshot::channel::<u8>();
            set.push(rx);
            assert_eq!(set.len(), 1);
            assert!(set.poll_next_unpin(&mut cx).is_pending());
            // FuturesUnordered would have woken the task here: it polled all it holds.
            assert_eq!(counter.0.load(Ordering::SeqCst), usize::from(round - 1));
            tx.send(round).unwrap();
            assert_eq!(counter.0.load(Ordering::SeqCst), usize::from(round));
            assert_eq!(set.poll_next_unpin(&mut cx), Poll::Ready(Some(Ok(round))));
            assert!(set.is_empty());
            assert_eq!(set.poll_next_unpin(&mut cx), Poll::Ready(None));
        }
    }

    /// Always wakes its task and stays pending, counting its polls.
    struct Restless(Arc<AtomicUsize>);

    impl Future for Restless {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            cx.waker().wake_by_ref();
            Poll::Pending
        }
    }

    #[test]
    fn a_future_that_always_wakes_itself_makes_the_set_yield() {
        let counter = Arc::new(CountingWaker::default());
        let waker = Waker::from(counter.clone());
        let mut cx = Context::from_waker(&waker);
        let polls = Arc::new(AtomicUsize::new(0));
        let mut set = FutureSet::new();
        set.push(Restless(polls.clone()));
        assert!(set.poll_next_unpin(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 2, "polled twice in one call");
        assert!(
            counter.0.load(Ordering::SeqCst) >= 1,
            "the task is woken to go on"
        );
    }

    #[test]
    fn futures_pushed_together_finish_in_any_order() {
        let waker = Waker::from(Arc::new(CountingWaker::default()));
        let mut cx = Context::from_waker(&waker);
        let mut set = FutureSet::new();
        let (first_tx, first) = tokio::sync::oneshot::channel::<u8>();
        let (second_tx, second) = tokio::sync::oneshot::channel::<u8>();
        set.push(first);
        set.push(second);
        assert!(set.poll_next_unpin(&mut cx).is_pending());
        second_tx.send(2).unwrap();
        assert_eq!(set.poll_next_unpin(&mut cx), Poll::Ready(Some(Ok(2))));
        first_tx.send(1).unwrap();
        assert_eq!(set.poll_next_unpin(&mut cx), Poll::Ready(Some(Ok(1))));
        assert_eq!(set.poll_next_unpin(&mut cx), Poll::Ready(None));
    }
}
