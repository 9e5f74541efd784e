//! The gateway run's one shutdown: a cancellation token every listener, accept loop and session watches, and
//! a task tracker that says when the tasks doing work for devices (connections, sessions, proxied flows) have
//! ended. `daemon` owns it; on SIGTERM it cancels, then waits, with a bound, so sessions end through their
//! normal path and write their end records before the data path and the audit writer stop.
//!
//! A leaf module (tokio-util only). Never: spawn a loop that outlives the token on the tracker (the wait would
//! then always run into its bound).
#![deny(unsafe_code)]

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Runs `task` on the current runtime, tracked: the shutdown waits for it.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Runs `task` on the runtime of `handle` (another thread's), tracked like `spawn`.
    pub fn spawn_on<F>(&self, task: F, handle: &tokio::runtime::Handle) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn_on(task, handle)
    }

    /// Completes once the shutdown has begun.
    pub fn cancelled(&self) -> WaitForCancellationFuture<'_> {
        self.token.cancelled()
    }

    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// A token cancelled with this shutdown (for a part that also stops on its own, like a listener a reload
    /// turns off).
    pub fn child_token(&self) -> CancellationToken {
        self.token.child_token()
    }

    /// Begins the shutdown and waits up to `bound` for every tracked task to end. Returns how many were still
    /// running at the bound (they are dropped with the runtime).
    pub async fn run_down(&self, bound: Duration) -> usize {
        self.token.cancel();
        self.tracker.close();
        match tokio::time::timeout(bound, self.tracker.wait()).await {
            Ok(()) => 0,
            Err(_) => self.tracker.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn run_down_waits_for_tasks_that_end_on_the_token_and_bounds_the_rest() {
        let s = Shutdown::new();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let watcher = s.clone();
        s.spawn(async move {
            watcher.cancelled().await;
            // Its end record, written after the token fired and before the wait returns.
            let _ = tx.send("end record");
        });
        assert_eq!(s.run_down(Duration::from_secs(30)).await, 0);
        assert_eq!(rx.await.unwrap(), "end record");

        // A task that ignores the token is waited for only up to the bound.
        let s = Shutdown::new();
        s.spawn(std::future::pending::<()>());
        assert!(!s.child_token().is_cancelled());
        assert_eq!(s.run_down(Duration::from_millis(50)).await, 1);
        assert!(s.is_cancelled());
    }
}
