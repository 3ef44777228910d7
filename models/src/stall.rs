//! A guard against an engine that stops answering: a generator whose engine has given no
//! answer for `timeout` while requests wait fails them, and every later one at once, with
//! an error naming the engine. A nightly run then ends with those rows failed (each says
//! why) instead of hanging until someone kills it.
//!
//! Answers are the only sign of life every backend gives (mistral.rs answers a request
//! whole), so the clock restarts at every answer, to any request: a busy engine answers
//! some request every few seconds, a stalled one none. `timeout` must be longer than the
//! slowest single answer (its prompt's prefill and every token of it).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;

use crate::generator::{
    EngineStats, Generation, GenerationRequest, Generator, GeneratorError, Head, SharedGenerator,
};

/// A [`Generator`] that fails what its engine leaves unanswered for too long.
pub struct StallGuard {
    inner: SharedGenerator,
    /// The backend, for messages (`mistralrs`).
    engine: String,
    timeout: Duration,
    state: Mutex<State>,
}

struct State {
    /// The latest answer of the engine, to any request.
    last_answer: Instant,
    /// Set once the engine stalled: later requests fail at once.
    stalled: bool,
}

impl StallGuard {
    /// `inner`, whose requests fail once `engine` has answered none for `timeout`.
    pub fn wrap(inner: SharedGenerator, engine: &str, timeout: Duration) -> SharedGenerator {
        Arc::new(Self {
            inner,
            engine: engine.to_string(),
            timeout,
            state: Mutex::new(State {
                last_answer: Instant::now(),
                stalled: false,
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stalled_error(&self) -> GeneratorError {
        GeneratorError::Request(format!(
            "the {} engine gave no answer for {:.0} s while requests waited: it stalled, and \
             its requests fail (summarize.stall_timeout_s)",
            self.engine,
            self.timeout.as_secs_f64()
        ))
    }

    /// `answer`, unless the engine answers nothing for `timeout` from the later of this
    /// request's start and its latest answer to any request.
    async fn guarded<T>(
        &self,
        answer: BoxFuture<'_, Result<T, GeneratorError>>,
    ) -> Result<T, GeneratorError> {
        if self.state().stalled {
            return Err(self.stalled_error());
        }
        let started = Instant::now();
        tokio::pin!(answer);
        loop {
            let since = self.state().last_answer.max(started);
            tokio::select! {
                result = &mut answer => {
                    self.state().last_answer = Instant::now();
                    return result;
                }
                () = tokio::time::sleep_until(since + self.timeout) => {
                    let mut state = self.state();
                    if state.stalled || state.last_answer.max(started) + self.timeout <= Instant::now() {
                        state.stalled = true;
                        drop(state);
                        return Err(self.stalled_error());
                    }
                }
            }
        }
    }
}

impl Generator for StallGuard {
    fn model(&self) -> &str {
        self.inner.model()
    }

    fn generate(
        &self,
        request: GenerationRequest,
    ) -> BoxFuture<'_, Result<Generation, GeneratorError>> {
        Box::pin(self.guarded(self.inner.generate(request)))
    }

    fn truncate(
        &self,
        text: String,
        max_tokens: usize,
    ) -> BoxFuture<'_, Result<Head, GeneratorError>> {
        // The tokenizer's work, not the engine's.
        self.inner.truncate(text, max_tokens)
    }

    fn choose(
        &self,
        prompt: String,
        labels: Arc<[String]>,
    ) -> BoxFuture<'_, Result<Generation, GeneratorError>> {
        Box::pin(self.guarded(self.inner.choose(prompt, labels)))
    }

    fn fill(
        &self,
        prompt: String,
        fields: Arc<[String]>,
        max_value_tokens: usize,
    ) -> BoxFuture<'_, Result<Generation, GeneratorError>> {
        Box::pin(self.guarded(self.inner.fill(prompt, fields, max_value_tokens)))
    }

    fn engine_stats(&self) -> Option<EngineStats> {
        self.inner.engine_stats()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An engine that answers a prompt after the milliseconds it names, and never answers
    /// "stall": what a stalled engine looks like from outside.
    struct Timed;

    impl Generator for Timed {
        fn model(&self) -> &str {
            "timed"
        }

        fn generate(
            &self,
            request: GenerationRequest,
        ) -> BoxFuture<'_, Result<Generation, GeneratorError>> {
            Box::pin(async move {
                match request.prompt.parse::<u64>() {
                    Ok(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                    Err(_) => std::future::pending::<()>().await,
                }
                Ok(Generation {
                    text: request.prompt,
                    prompt_tokens: 1,
                    completion_tokens: 1,
                    latency: Duration::ZERO,
                })
            })
        }

        fn truncate(
            &self,
            text: String,
            _max_tokens: usize,
        ) -> BoxFuture<'_, Result<Head, GeneratorError>> {
            Box::pin(async move { Ok(Head::whole(text)) })
        }
    }

    fn ask<'a>(
        g: &'a SharedGenerator,
        prompt: &str,
    ) -> BoxFuture<'a, Result<Generation, GeneratorError>> {
        g.generate(GenerationRequest::greedy(prompt.into(), 4))
    }

    /// Answers slower than the timeout pass while others keep arriving; a request left
    /// unanswered past the timeout with nothing else answered fails naming the engine,
    /// and so does every later one, at once.
    #[tokio::test]
    async fn a_stalled_engine_fails_its_requests_and_the_later_ones() {
        let g = StallGuard::wrap(Arc::new(Timed), "timed", Duration::from_secs(1));
        // 2 s in all, but never more than 0.4 s without an answer.
        let steady = ["400", "800", "1200", "1600", "2000"].map(|p| ask(&g, p));
        for answer in futures::future::join_all(steady).await {
            assert!(answer.is_ok(), "{answer:?}");
        }
        let started = Instant::now();
        let stalled = ask(&g, "stall").await;
        let waited = started.elapsed();
        let message = stalled.map(|_| ()).map_err(|e| e.to_string()).unwrap_err();
        assert!(
            message.contains("timed engine") && message.contains("stalled"),
            "{message}"
        );
        assert!(waited >= Duration::from_secs(1), "{waited:?}");
        let started = Instant::now();
        assert!(ask(&g, "10").await.is_err(), "the engine stays stalled");
        assert!(
            started.elapsed() < Duration::from_millis(10),
            "and says so at once"
        );
    }
}
