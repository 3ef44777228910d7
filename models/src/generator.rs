//! Generators: the models `summarize` runs, behind one trait (DESIGN.md: mistral.rs for
//! the architectures it loads, our own BLOOM for SeqGPT).
//!
//! A generator takes one prompt at a time and answers asynchronously; the engine behind it
//! batches whatever requests are in flight (continuous batching), so callers keep many
//! requests open rather than building batches themselves.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// Sampling settings shared by every backend.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 is greedy decoding.
    pub temperature: f64,
    /// Nucleus size: the smallest set of tokens whose probabilities add up to this.
    pub top_p: f64,
    pub max_new_tokens: usize,
    /// With [`GenerationRequest::key`], what makes sampling repeatable.
    pub seed: u64,
}

/// One prompt to complete.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// The user's text: a chat model gets it as the user turn, a plain model as is.
    pub prompt: String,
    pub sampling: Sampling,
    /// Identifies the input (e.g. a hash of the ticket id): the random draws depend on
    /// `(seed, key, position)` only, so a row gets the same summary whatever else is in
    /// flight and in whatever order rows arrive.
    pub key: u64,
}

impl GenerationRequest {
    /// `prompt` decoded greedily, up to `max_new_tokens`: the classification and
    /// extraction questions, whose answers must not depend on a draw.
    pub fn greedy(prompt: String, max_new_tokens: usize) -> Self {
        Self {
            prompt,
            sampling: Sampling {
                temperature: 0.0,
                top_p: 1.0,
                max_new_tokens,
                seed: 0,
            },
            key: 0,
        }
    }
}

/// A completion and what it cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    pub text: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// From the engine taking the request to its answer.
    pub latency: Duration,
}

/// Why a generator could not load or answer.
#[derive(Debug, thiserror::Error)]
pub enum GeneratorError {
    /// The model could not be loaded; nothing was generated.
    #[error("model {model}: {reason}")]
    Load { model: String, reason: String },
    /// One request failed (its row records this); the engine goes on.
    #[error("{0}")]
    Request(String),
    /// The engine stopped: every later request fails too.
    #[error("the generation engine stopped: {0}")]
    EngineGone(String),
}

/// A text generation backend.
pub trait Generator: Send + Sync {
    /// What the `model` output column records (a path or model id).
    fn model(&self) -> &str;

    /// Completes one prompt.
    fn generate(
        &self,
        request: GenerationRequest,
    ) -> BoxFuture<'_, Result<Generation, GeneratorError>>;

    /// The head of `text` that fits in `max_tokens` tokens of this model's tokenizer
    /// (all of it when it fits).
    fn truncate(
        &self,
        text: String,
        max_tokens: usize,
    ) -> BoxFuture<'_, Result<Head, GeneratorError>>;

    /// Answers `prompt` with exactly one of `labels` (the model's greedy choice with
    /// decoding restricted to the labels' tokens, so never free text), as the text of
    /// a [`Generation`]. Backends that cannot restrict decoding refuse.
    fn choose(
        &self,
        prompt: String,
        labels: Arc<[String]>,
    ) -> BoxFuture<'_, Result<Generation, GeneratorError>> {
        let _ = (prompt, labels);
        Box::pin(async move {
            Err(GeneratorError::Request(format!(
                "{}: this backend cannot restrict answers to a list of labels (the `llama` \
                 and `seqgpt` backends can)",
                self.model()
            )))
        })
    }

    /// Answers `prompt` by filling in a form: one `name: value` line per field of
    /// `fields`, in order. Engines that can constrain decoding write each `name:`
    /// themselves and let the model write each value, greedily, up to its line end or
    /// `max_value_tokens`, so that even a small chat model that ignores the format fills
    /// it in. Others answer freely (greedy, up to `max_value_tokens` per field), for the
    /// caller to read strictly.
    fn fill(
        &self,
        prompt: String,
        fields: Arc<[String]>,
        max_value_tokens: usize,
    ) -> BoxFuture<'_, Result<Generation, GeneratorError>> {
        self.generate(GenerationRequest::greedy(
            prompt,
            max_value_tokens * fields.len().max(1),
        ))
    }

    /// What a batching engine has done since it started, where the backend counts it.
    fn engine_stats(&self) -> Option<EngineStats> {
        None
    }

    /// Completes a batch of prompts, answers in request order. The engine sees them all
    /// at once; callers that want to keep it busy across batches use
    /// [`Generator::generate`] with their own window of requests in flight.
    fn generate_batch(
        &self,
        requests: Vec<GenerationRequest>,
    ) -> BoxFuture<'_, Vec<Result<Generation, GeneratorError>>> {
        Box::pin(futures::future::join_all(
            requests.into_iter().map(|r| self.generate(r)),
        ))
    }
}

/// A batching engine's work so far ([`Generator::engine_stats`]): how many times it
/// prefilled a group of new prompts, and how many decoding steps (one token for every
/// sequence in the batch) it ran. Rows that share steps were batched.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub prefills: u64,
    pub steps: u64,
}

/// The part of a text that fits a prompt's token budget ([`Generator::truncate`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The text's head: whole tokens from its start.
    pub text: String,
    /// Tokens of the text past the budget, left out; 0 when it all fit.
    pub cut_tokens: usize,
}

impl Head {
    /// A text that fits whole.
    pub fn whole(text: String) -> Self {
        Self {
            text,
            cut_tokens: 0,
        }
    }
}

/// PagedAttention's KV cache: the job file's `[summarize.paged_attention]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PagedAttention {
    /// Default: on with CUDA, off on CPU. On the CPU mistral.rs has no paged kernels and
    /// refuses it; the seqgpt engine runs the same blocks with attention in Rust there,
    /// slower than its default per-sequence caches (it is how the block bookkeeping is
    /// tested without a GPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// The cache's size in MiB; wins over `gpu_memory_fraction`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_mb: Option<usize>,
    /// The share of free GPU memory the cache may take, e.g. 0.8. Defaults: mistral.rs's
    /// (room for a 4096-token context); the seqgpt engine takes half of what is free once
    /// the model is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_fraction: Option<f32>,
    /// Tokens per cache block: 8, 16 or 32. Default: 16 (seqgpt) or mistral.rs's choice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<usize>,
}

impl PagedAttention {
    /// Why these settings cannot be used, naming the setting.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(size) = self.block_size
            && ![8, 16, 32].contains(&size)
        {
            return Err(("block_size", "must be 8, 16 or 32".into()));
        }
        if let Some(f) = self.gpu_memory_fraction
            && !(f > 0.0 && f <= 1.0)
        {
            return Err(("gpu_memory_fraction", "must be in (0, 1]".into()));
        }
        Ok(())
    }
}

/// How prompts reach a model: the job file's `summarize.prompt_format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptFormat {
    /// The user turn of the model's chat template when it has one, raw text otherwise.
    #[default]
    Auto,
    /// Always the user turn of the chat template.
    Chat,
    /// Always the bare text.
    Raw,
}

/// Shared handle to a generator.
pub type SharedGenerator = Arc<dyn Generator>;

/// The next token for `logits`: the argmax at temperature 0, otherwise a draw with
/// `uniform` (in [0, 1)) from the top-p nucleus of softmax(logits / temperature). Ties
/// in the argmax go to the lowest id, as in transformers.
pub fn pick_token(logits: &[f32], temperature: f64, top_p: f64, uniform: f64) -> usize {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &l)| {
                if l > best.1 { (i, l) } else { best }
            })
            .0
    };
    if temperature <= 0.0 || logits.is_empty() {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if !max.is_finite() {
        return argmax();
    }
    let mut probs: Vec<(usize, f64)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((f64::from(l) - f64::from(max)) / temperature).exp()))
        .collect();
    let total: f64 = probs.iter().map(|p| p.1).sum();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    // The nucleus: the most probable tokens up to mass top_p (at least one).
    let mut mass = 0.0;
    let mut keep = 0;
    for &(_, p) in &probs {
        mass += p / total;
        keep += 1;
        if mass >= top_p {
            break;
        }
    }
    let nucleus = &probs[..keep];
    let nucleus_total: f64 = nucleus.iter().map(|p| p.1).sum();
    let mut target = uniform * nucleus_total;
    for &(id, p) in nucleus {
        if target < p {
            return id;
        }
        target -= p;
    }
    nucleus[keep - 1].0
}

/// A uniform number in [0, 1) fixed by `(seed, key, step)`: SplitMix64 over the three,
/// so that every decoding step of every request has its own repeatable draw.
pub fn uniform_draw(seed: u64, key: u64, step: u64) -> f64 {
    let mut z = seed
        .wrapping_add(key.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(step.wrapping_mul(0xD1B5_4A32_D192_ED03));
    for _ in 0..2 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
    }
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(pick_token(&[0.1, 3.0, 3.0, -1.0], 0.0, 0.9, 0.99), 1);
    }

    #[test]
    fn top_p_limits_the_draw_to_the_nucleus() {
        // softmax at T=1: token 2 holds ~0.84 of the mass; with top_p 0.8 only it is left.
        let logits = [0.0, 1.0, 3.0];
        for u in [0.0, 0.5, 0.999] {
            assert_eq!(pick_token(&logits, 1.0, 0.8, u), 2);
        }
        // With the whole distribution, a high draw reaches the least likely token.
        assert_eq!(pick_token(&logits, 1.0, 1.0, 0.999), 0);
    }

    #[test]
    fn draws_are_repeatable_and_distinct_per_step() {
        assert_eq!(uniform_draw(7, 1, 2), uniform_draw(7, 1, 2));
        assert_ne!(uniform_draw(7, 1, 2), uniform_draw(7, 1, 3));
        assert_ne!(uniform_draw(7, 1, 2), uniform_draw(8, 1, 2));
    }

    proptest! {
        #[test]
        fn picks_a_valid_token(logits in prop::collection::vec(-50f32..50.0, 1..64),
                               t in 0f64..2.0, p in 0.01f64..1.0, u in 0f64..1.0) {
            let id = pick_token(&logits, t, p, u);
            prop_assert!(id < logits.len());
        }

        #[test]
        fn draws_are_uniform_range(seed: u64, key: u64, step: u64) {
            let u = uniform_draw(seed, key, step);
            prop_assert!((0.0..1.0).contains(&u));
        }
    }
}
