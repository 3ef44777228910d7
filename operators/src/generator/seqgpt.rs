//! The `seqgpt` backend: SeqGPT-560M and other BLOOM-family checkpoints through abridge's
//! own BLOOM ([`super::bloom`]), as mistral.rs has no BLOOM.
//!
//! For now each request decodes on its own blocking thread with a KV cache (prefill, then
//! one token per step), sampling with the shared [`pick_token`] / [`uniform_draw`], so a
//! row's summary depends only on (seed, key, position) as with every backend. The batch
//! engine (continuous batching over the cache) comes next.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use futures::future::BoxFuture;
use tokenizers::Tokenizer;

use super::bloom::Bloom;
use super::{Generation, GenerationRequest, Generator, GeneratorError, pick_token, uniform_draw};

/// A BLOOM checkpoint ready to summarize.
pub struct SeqGptGenerator {
    model: Arc<Bloom>,
    tokenizer: Arc<Tokenizer>,
    name: String,
    device: Device,
}

impl SeqGptGenerator {
    /// Loads the checkpoint in `dir` (config.json, tokenizer.json, model.safetensors).
    pub fn load(dir: &Path, device: &Device) -> Result<Self, GeneratorError> {
        let model = Bloom::load(dir, device)?;
        let tokenizer =
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| GeneratorError::Load {
                model: dir.display().to_string(),
                reason: format!("tokenizer.json: {e}"),
            })?;
        Ok(Self {
            model: Arc::new(model),
            tokenizer: Arc::new(tokenizer),
            name: dir.display().to_string(),
            device: device.clone(),
        })
    }
}

impl Generator for SeqGptGenerator {
    fn model(&self) -> &str {
        &self.name
    }

    fn generate(
        &self,
        request: GenerationRequest,
    ) -> BoxFuture<'_, Result<Generation, GeneratorError>> {
        let (model, tokenizer) = (Arc::clone(&self.model), Arc::clone(&self.tokenizer));
        let device = self.device.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || decode(&model, &tokenizer, &device, &request))
                .await
                .map_err(|e| GeneratorError::EngineGone(e.to_string()))?
        })
    }

    fn truncate(
        &self,
        text: String,
        max_tokens: usize,
    ) -> BoxFuture<'_, Result<String, GeneratorError>> {
        let tokenizer = Arc::clone(&self.tokenizer);
        Box::pin(async move {
            let encoding = tokenizer
                .encode(text.as_str(), false)
                .map_err(|e| GeneratorError::Request(format!("tokenizer: {e}")))?;
            if encoding.len() <= max_tokens {
                return Ok(text);
            }
            // The text up to the end of the last token that fits.
            let end = encoding
                .get_offsets()
                .get(max_tokens.saturating_sub(1))
                .map_or(0, |&(_, end)| end);
            Ok(text.get(..end).unwrap_or_default().to_string())
        })
    }
}

fn decode(
    model: &Bloom,
    tokenizer: &Tokenizer,
    device: &Device,
    request: &GenerationRequest,
) -> Result<Generation, GeneratorError> {
    let started = Instant::now();
    let failed = |e: candle_core::Error| GeneratorError::Request(format!("BLOOM: {e}"));
    let prompt = tokenizer
        .encode(request.prompt.as_str(), true)
        .map_err(|e| GeneratorError::Request(format!("tokenizer: {e}")))?
        .get_ids()
        .to_vec();
    if prompt.is_empty() {
        return Err(GeneratorError::Request("the prompt has no tokens".into()));
    }
    let eos = model.config().eos_token_id;
    let sampling = &request.sampling;
    let mut cache = model.new_cache();
    let mut feed = prompt.clone();
    let mut generated: Vec<u32> = Vec::new();
    for step in 0..sampling.max_new_tokens {
        let seen = prompt.len() + generated.len();
        let ids = Tensor::new(feed.as_slice(), device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(failed)?;
        let mask = Tensor::ones((1, seen), DType::U32, device).map_err(failed)?;
        let logits = model
            .forward_cached(&ids, &mask, &mut cache)
            .and_then(|l| {
                let last = l.dim(1)? - 1;
                l.get(0)?.get(last)?.to_vec1::<f32>()
            })
            .map_err(failed)?;
        let draw = uniform_draw(sampling.seed, request.key, step as u64);
        let next = pick_token(&logits, sampling.temperature, sampling.top_p, draw) as u32;
        if Some(next) == eos {
            break;
        }
        generated.push(next);
        feed = vec![next];
    }
    let text = tokenizer
        .decode(&generated, true)
        .map_err(|e| GeneratorError::Request(format!("tokenizer: {e}")))?;
    Ok(Generation {
        text,
        prompt_tokens: prompt.len(),
        completion_tokens: generated.len(),
        latency: started.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::Sampling;

    fn fixture() -> (SeqGptGenerator, serde_json::Value, std::path::PathBuf) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/bloom-tiny-4h");
        let generator = SeqGptGenerator::load(&dir, &Device::Cpu).expect("fixture model");
        let text = std::fs::read_to_string(dir.join("expected.json")).expect("expected.json");
        (generator, serde_json::from_str(&text).expect("JSON"), dir)
    }

    fn request(prompt: &str, temperature: f64, key: u64) -> GenerationRequest {
        GenerationRequest {
            prompt: prompt.into(),
            sampling: Sampling {
                temperature,
                top_p: 0.9,
                max_new_tokens: 20,
                seed: 3,
            },
            key,
        }
    }

    #[tokio::test]
    async fn greedy_summaries_are_transformers_tokens_and_sampling_repeats() {
        let (generator, expected, _) = fixture();
        // The fixture's first greedy case is the prompt "The printer is offline".
        let tokens: Vec<u32> = expected["greedy"][0]["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .map(|t| t.as_u64().expect("id") as u32)
            .collect();
        let eos = generator.model.config().eos_token_id;
        let until_eos: Vec<u32> = tokens
            .iter()
            .copied()
            .take_while(|&t| Some(t) != eos)
            .collect();
        let answer = generator
            .generate(request("The printer is offline", 0.0, 1))
            .await
            .expect("a greedy answer");
        assert_eq!(answer.completion_tokens, until_eos.len());
        assert_eq!(
            answer.text,
            generator
                .tokenizer
                .decode(&until_eos, true)
                .expect("decode")
        );
        assert!(answer.prompt_tokens > 0);

        // Sampling: the same (seed, key) gives the same text; another key another draw.
        let a = generator
            .generate(request("VPN drops", 1.0, 7))
            .await
            .expect("a");
        let b = generator
            .generate(request("VPN drops", 1.0, 7))
            .await
            .expect("b");
        assert_eq!(a.text, b.text);
        let others: Vec<String> = futures::future::join_all(
            (8..12).map(|key| generator.generate(request("VPN drops", 1.0, key))),
        )
        .await
        .into_iter()
        .map(|g| g.expect("answer").text)
        .collect();
        assert!(others.iter().any(|t| *t != a.text), "{others:?}");
    }

    #[tokio::test]
    async fn truncation_keeps_whole_tokens_from_the_head() {
        let (generator, _, _) = fixture();
        let text = "The printer is offline again and print jobs are stuck".to_string();
        let all = generator.truncate(text.clone(), 1000).await.expect("fits");
        assert_eq!(all, text);
        let head = generator.truncate(text.clone(), 3).await.expect("cut");
        assert!(
            text.starts_with(&head) && head.len() < text.len(),
            "{head:?}"
        );
        let count = generator
            .tokenizer
            .encode(head.as_str(), false)
            .expect("encode")
            .len();
        assert!(count <= 3, "{head:?} is {count} tokens");
    }
}
