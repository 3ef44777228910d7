//! The `seqgpt` backend: SeqGPT-560M and other BLOOM-family checkpoints through abridge's
//! own BLOOM ([`super::bloom`]), as mistral.rs has no BLOOM.
//!
//! A batch engine on its own thread (the model never blocks the async runtime): requests
//! queue up; up to `max_batch` sequences decode together, one token each per step, and a
//! finished sequence leaves at once while a waiting one is prefilled and joins the next
//! step (continuous batching). Sampling is the shared [`pick_token`] / [`uniform_draw`], so
//! a row's summary depends only on (seed, key, position), never on its batch neighbours.

use std::collections::VecDeque;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::time::Instant;

use candle_core::Device;
use futures::channel::oneshot;
use futures::future::BoxFuture;
use tokenizers::Tokenizer;

use super::bloom::{Bloom, SequenceCache};
use super::{Generation, GenerationRequest, Generator, GeneratorError, pick_token, uniform_draw};

/// A BLOOM checkpoint ready to summarize.
pub struct SeqGptGenerator {
    tokenizer: Arc<Tokenizer>,
    name: String,
    /// The engine's inbox; the engine thread ends when this is dropped.
    queue: Sender<Pending>,
}

/// A request waiting for the engine.
struct Pending {
    prompt: Vec<u32>,
    request: GenerationRequest,
    started: Instant,
    reply: oneshot::Sender<Result<Generation, GeneratorError>>,
}

/// A sequence in the batch.
struct Running {
    pending: Pending,
    cache: SequenceCache,
    generated: Vec<u32>,
    /// Why the sequence failed, once it has.
    failed: Option<String>,
}

impl SeqGptGenerator {
    /// Loads the checkpoint in `dir` (config.json, tokenizer.json, weights) and starts its
    /// engine, which decodes up to `max_batch` sequences at a time.
    pub fn load(dir: &Path, device: &Device, max_batch: usize) -> Result<Self, GeneratorError> {
        let model = Bloom::load(dir, device)?;
        let tokenizer =
            Tokenizer::from_file(dir.join("tokenizer.json")).map_err(|e| GeneratorError::Load {
                model: dir.display().to_string(),
                reason: format!("tokenizer.json: {e}"),
            })?;
        let tokenizer = Arc::new(tokenizer);
        let (queue, inbox) = mpsc::channel();
        let engine = Engine {
            model,
            tokenizer: Arc::clone(&tokenizer),
            max_batch: max_batch.max(1),
        };
        std::thread::Builder::new()
            .name("abridge-bloom".into())
            .spawn(move || engine.run(inbox))
            .map_err(|e| GeneratorError::Load {
                model: dir.display().to_string(),
                reason: format!("starting the engine thread: {e}"),
            })?;
        Ok(Self {
            tokenizer,
            name: dir.display().to_string(),
            queue,
        })
    }

    fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<oneshot::Receiver<Result<Generation, GeneratorError>>, GeneratorError> {
        let started = Instant::now();
        let prompt = self
            .tokenizer
            .encode(request.prompt.as_str(), true)
            .map_err(|e| GeneratorError::Request(format!("tokenizer: {e}")))?
            .get_ids()
            .to_vec();
        if prompt.is_empty() {
            return Err(GeneratorError::Request("the prompt has no tokens".into()));
        }
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            prompt,
            request,
            started,
            reply,
        };
        self.queue
            .send(pending)
            .map_err(|_| GeneratorError::EngineGone("the BLOOM engine thread ended".into()))?;
        Ok(answer)
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
        let answer = self.submit(request);
        Box::pin(async move {
            answer?.await.map_err(|_| {
                GeneratorError::Request(
                    "the BLOOM engine dropped the request (an engine error; later requests are \
                     served)"
                        .into(),
                )
            })?
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

/// The model and its decoding loop, owned by the engine thread.
struct Engine {
    model: Bloom,
    tokenizer: Arc<Tokenizer>,
    max_batch: usize,
}

impl Engine {
    /// Serves requests until every sender is gone and the last sequence has finished.
    fn run(self, inbox: Receiver<Pending>) {
        let mut waiting: VecDeque<Pending> = VecDeque::new();
        let mut running: Vec<Running> = Vec::new();
        let mut open = true;
        loop {
            if running.is_empty() && waiting.is_empty() {
                match inbox.recv() {
                    Ok(pending) => waiting.push_back(pending),
                    Err(_) => return,
                }
            }
            while open {
                match inbox.try_recv() {
                    Ok(pending) => waiting.push_back(pending),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            let free = self.max_batch.saturating_sub(running.len());
            let joining: Vec<Pending> = (0..free).map_while(|_| waiting.pop_front()).collect();
            // An engine error that panics (a kernel, an index out of range) fails the
            // requests it was serving and nothing else: the batch restarts empty, the
            // model's weights are read-only and unharmed, and later requests are served.
            if !joining.is_empty() {
                // A panic here drops the group's replies: those rows fail as dropped.
                if let Ok(admitted) = catch_unwind(AssertUnwindSafe(|| self.admit(joining))) {
                    running.extend(admitted);
                }
            }
            if !running.is_empty()
                && let Err(panic) = catch_unwind(AssertUnwindSafe(|| self.step(&mut running)))
            {
                let why = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic".into());
                for sequence in running.drain(..) {
                    let _ = sequence
                        .pending
                        .reply
                        .send(Err(GeneratorError::Request(format!(
                            "BLOOM engine error ({why}); the engine restarted its batch"
                        ))));
                }
            }
        }
    }

    /// Prefills new sequences together and samples their first tokens; returns those
    /// that go on (the others are answered: failed, or finished after one token). When
    /// the group's prefill fails, each prompt is tried alone, so that one bad prompt
    /// fails only its own row.
    fn admit(&self, group: Vec<Pending>) -> Vec<Running> {
        let prompts: Vec<(&[u32], usize)> = group
            .iter()
            .map(|p| (p.prompt.as_slice(), p.request.sampling.max_new_tokens))
            .collect();
        let prefilled = match self.model.prefill(&prompts) {
            Ok(prefilled) => prefilled,
            Err(_) if group.len() > 1 => {
                return group
                    .into_iter()
                    .flat_map(|p| self.admit(vec![p]))
                    .collect();
            }
            Err(e) => {
                for pending in group {
                    let _ = pending
                        .reply
                        .send(Err(GeneratorError::Request(format!("BLOOM: {e}"))));
                }
                return Vec::new();
            }
        };
        let mut going_on = Vec::with_capacity(group.len());
        for (pending, (logits, cache)) in group.into_iter().zip(prefilled) {
            let mut sequence = Running {
                pending,
                cache,
                generated: Vec::new(),
                failed: None,
            };
            if sequence.pending.request.sampling.max_new_tokens == 0
                || self.sample(&mut sequence, &logits)
            {
                self.finish(sequence);
            } else {
                going_on.push(sequence);
            }
        }
        going_on
    }

    /// Feeds every running sequence its newest token and samples the next; finished
    /// sequences are answered and leave. A failed step fails the sequences in it (their
    /// rows record why) and the engine goes on with the next requests.
    fn step(&self, running: &mut Vec<Running>) {
        fail::fail_point!("seqgpt::step");
        let tokens: Vec<u32> = running
            .iter()
            .map(|s| s.generated.last().copied().unwrap_or_default())
            .collect();
        let logits = {
            let mut caches: Vec<&mut SequenceCache> =
                running.iter_mut().map(|s| &mut s.cache).collect();
            self.model
                .decode_step(&tokens, &mut caches)
                .and_then(|l| l.to_vec2::<f32>())
        };
        let logits = match logits {
            Ok(logits) => logits,
            Err(e) => {
                for sequence in running.drain(..) {
                    let _ = sequence
                        .pending
                        .reply
                        .send(Err(GeneratorError::Request(format!(
                            "BLOOM decoding step: {e}"
                        ))));
                }
                return;
            }
        };
        let mut still = Vec::with_capacity(running.len());
        for (mut sequence, logits) in running.drain(..).zip(logits) {
            if self.sample(&mut sequence, &logits) {
                self.finish(sequence);
            } else {
                still.push(sequence);
            }
        }
        *running = still;
    }

    /// Draws the next token into `sequence`; true when the sequence is done (end of
    /// sequence drawn, `max_new_tokens` reached, or failed: NaN logits, from broken
    /// weights or an overflow, fail the row rather than decode garbage).
    fn sample(&self, sequence: &mut Running, logits: &[f32]) -> bool {
        if logits.iter().any(|l| l.is_nan()) {
            sequence.failed = Some(format!(
                "BLOOM: the model's logits are NaN at generated token {}",
                sequence.generated.len() + 1
            ));
            return true;
        }
        let request = &sequence.pending.request;
        let sampling = &request.sampling;
        let step = sequence.generated.len() as u64;
        let draw = uniform_draw(sampling.seed, request.key, step);
        let next = pick_token(logits, sampling.temperature, sampling.top_p, draw) as u32;
        if Some(next) == self.model.config().eos_token_id {
            return true;
        }
        sequence.generated.push(next);
        sequence.generated.len() >= sampling.max_new_tokens
    }

    fn finish(&self, sequence: Running) {
        let Running {
            pending,
            generated,
            failed,
            ..
        } = sequence;
        if let Some(reason) = failed {
            let _ = pending.reply.send(Err(GeneratorError::Request(reason)));
            return;
        }
        let answer = self
            .tokenizer
            .decode(&generated, true)
            .map(|text| Generation {
                text,
                prompt_tokens: pending.prompt.len(),
                completion_tokens: generated.len(),
                latency: pending.started.elapsed(),
            })
            .map_err(|e| GeneratorError::Request(format!("tokenizer: {e}")));
        let _ = pending.reply.send(answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::generator::Sampling;

    fn fixture() -> (SeqGptGenerator, serde_json::Value, std::path::PathBuf) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/bloom-tiny-4h");
        let generator = SeqGptGenerator::load(&dir, &Device::Cpu, 4).expect("fixture model");
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
        let (generator, expected, dir) = fixture();
        // The fixture's first greedy case is the prompt "The printer is offline".
        let tokens: Vec<u32> = expected["greedy"][0]["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .map(|t| t.as_u64().expect("id") as u32)
            .collect();
        let config = std::fs::read_to_string(dir.join("config.json")).expect("config");
        let config: serde_json::Value = serde_json::from_str(&config).expect("JSON");
        let eos = config["eos_token_id"].as_u64().map(|id| id as u32);
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
    async fn a_batch_answers_as_one_sequence_at_a_time_does() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/bloom-tiny-6h");
        let serial = SeqGptGenerator::load(&dir, &Device::Cpu, 1).expect("model");
        let batched = SeqGptGenerator::load(&dir, &Device::Cpu, 3).expect("model");
        // Eight requests for a batch of three: prompts of different lengths and different
        // budgets, so sequences leave at different steps and waiting ones join mid-way.
        let prompts = [
            "The printer is offline",
            "VPN drops every few minutes when I work from home",
            "打印机离线",
            "a",
            "My VPN connection drops every few minutes when I work from home over wifi.",
            "账户被锁定，无法登录。",
            "print jobs are stuck in the queue",
            "输入: 今天上午系统出现故障 抽取: 故障 输出: [GEN]",
        ];
        let requests: Vec<GenerationRequest> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut r = request(p, if i % 2 == 0 { 1.0 } else { 0.0 }, i as u64);
                r.sampling.max_new_tokens = 3 + 4 * (i % 4);
                r
            })
            .collect();
        let one_by_one: Vec<Generation> =
            futures::future::join_all(requests.iter().cloned().map(|r| serial.generate(r)))
                .await
                .into_iter()
                .map(|g| g.expect("serial answer"))
                .collect();
        let together = batched.generate_batch(requests.clone()).await;
        for ((a, b), r) in one_by_one.iter().zip(together).zip(&requests) {
            let b = b.expect("batched answer");
            assert_eq!(
                (&a.text, a.completion_tokens),
                (&b.text, b.completion_tokens)
            );
            assert!(b.completion_tokens <= r.sampling.max_new_tokens);
        }
        assert!(one_by_one.iter().any(|g| g.completion_tokens > 3));
    }

    #[tokio::test]
    async fn nan_logits_fail_the_row_and_the_engine_goes_on() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/bloom-tiny-4h");
        let copy = tempfile::tempdir().expect("temp dir");
        for file in ["config.json", "tokenizer.json"] {
            std::fs::copy(dir.join(file), copy.path().join(file)).expect("copy");
        }
        let mut weights =
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
                .expect("weights");
        let name = "transformer.ln_f.weight";
        let broken = (weights[name].ones_like().expect("ones") * f64::NAN).expect("nan");
        weights.insert(name.into(), broken);
        candle_core::safetensors::save(&weights, copy.path().join("model.safetensors"))
            .expect("save");
        let generator = SeqGptGenerator::load(copy.path(), &Device::Cpu, 2).expect("model");
        for _ in 0..2 {
            let err = generator
                .generate(request("The printer is offline", 0.0, 1))
                .await
                .expect_err("NaN logits");
            assert!(
                matches!(&err, GeneratorError::Request(m) if m.contains("NaN")),
                "{err}"
            );
        }
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
