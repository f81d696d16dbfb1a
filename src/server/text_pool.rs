//! A small fixed pool of threads for the server's text work: tokenizing prompts and rendering
//! chat templates, which take milliseconds for long inputs and must not hold up the async
//! runtime's workers (and so every other stream).
//!
//! Why a pool of its own rather than tokio's blocking pool: the `tokenizers` crate keeps its
//! BPE word cache per thread (up to 10,000 entries each, whole prompts for tokenizers without
//! a pre-tokenizer), and the blocking pool grows to hundreds of threads under load — the caches
//! multiplied with it (measured: +1.4 MB of heap per 1000 requests, still rising). A few
//! long-lived threads keep that memory bounded and the caches warm.
use super::error::{ApiError, ErrorKind};
use std::sync::Arc;

/// Threads of the text pool: enough to tokenize faster than a CPU engine consumes tokens,
/// few enough that their per-thread caches stay small.
pub fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(2, |n| n.get() / 2)
        .clamp(2, 8)
}

#[derive(Clone)]
pub struct TextPool(Arc<rayon::ThreadPool>);

impl TextPool {
    pub fn new(threads: usize) -> std::io::Result<Self> {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads.max(1))
            .thread_name(|i| format!("llmd-text-{i}"))
            .build()
            .map(|p| Self(Arc::new(p)))
            .map_err(std::io::Error::other)
    }

    /// Runs `f` on the pool and waits for it without blocking the runtime. A panic in `f` (a
    /// bug in a tokenizer or template engine) is a 500 for this request only.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.0.spawn(move || {
            if let Ok(v) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                let _ = tx.send(v);
            }
        });
        rx.await.map_err(|_| {
            ApiError::new(
                ErrorKind::Server,
                "tokenizing the request failed unexpectedly",
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_work_on_its_own_threads() {
        let pool = TextPool::new(2).unwrap();
        let name = pool
            .run(|| std::thread::current().name().map(str::to_string))
            .await
            .unwrap();
        assert!(name.is_some_and(|n| n.starts_with("llmd-text-")));
        let sums = futures_util::future::join_all((0..8u64).map(|i| pool.run(move || i * i))).await;
        let sums: Vec<u64> = sums.into_iter().map(Result::unwrap).collect();
        assert_eq!(sums, (0..8u64).map(|i| i * i).collect::<Vec<_>>());
        let e = pool.run(|| -> () { panic!("boom") }).await.unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(
            pool.run(|| 7).await.unwrap(),
            7,
            "the pool survives a panic"
        );
        assert!((2..=8).contains(&default_threads()));
    }
}
