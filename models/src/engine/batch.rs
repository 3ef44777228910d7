//! abridge's own batch engine, behind the `seqgpt` backend (SeqGPT-560M and other
//! BLOOM-family checkpoints, [`crate::models::bloom`]: mistral.rs has no BLOOM) and the
//! `llama` backend (Llama-architecture GGUF files on CPU, [`crate::models::llama`]:
//! mistral.rs decodes one sequence at a time there). The engine knows models only
//! through [`BatchModel`]; each model's file implements it and has the constructor that
//! starts an engine over it.
//!
//! The engine runs on its own thread (the model never blocks the async runtime): requests
//! queue up; up to `max_batch` sequences decode together, one token each per step, and a
//! finished sequence leaves at once while a waiting one is prefilled and joins the next
//! step (continuous batching). Sampling is the shared [`pick_token`] / [`uniform_draw`], so
//! a row's summary depends only on (seed, key, position), never on its batch neighbours.

use std::collections::{HashSet, VecDeque};
use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use candle_core::{D, DType, Tensor};
use futures::channel::oneshot;
use futures::future::BoxFuture;
use tokenizers::Tokenizer;

use super::attention;
use super::chat::render_chat;
use super::kv::SequenceCache;
use super::paged::{BlockTable, PagedKv};
use crate::generator::{
    EngineStats, Generation, GenerationRequest, Generator, GeneratorError, Head, pick_token,
    uniform_draw,
};

/// How long an idle engine waits, after a request, for the others of its burst.
const GATHER: Duration = Duration::from_millis(5);

/// A model the engine runs.
pub trait BatchModel: Send + 'static {
    /// Its family, in messages.
    fn family(&self) -> &'static str;
    fn eos_token_id(&self) -> Option<u32>;
    /// Most tokens a sequence may hold (prompt and answer), where the model has a limit.
    fn context_length(&self) -> Option<usize> {
        None
    }
    /// New prompts run together (each with room for that many more tokens): the logits
    /// of each one's last token `(prompts, vocab)` and their caches; with `paged`, the
    /// keys and values go to the blocks of each prompt's table.
    fn prefill(
        &self,
        prompts: &[(&[u32], usize)],
        paged: Option<(&mut PagedKv, &[BlockTable])>,
    ) -> candle_core::Result<(Tensor, Vec<SequenceCache>)>;
    /// One token for each sequence: the next token's logits `(batch, vocab)`.
    fn decode_step(
        &self,
        tokens: &[u32],
        caches: &mut [&mut SequenceCache],
        paged: Option<&mut PagedKv>,
    ) -> candle_core::Result<Tensor>;
}

/// A chat template and the token texts it may use.
pub(crate) struct Chat {
    pub(crate) template: String,
    pub(crate) bos_token: String,
    pub(crate) eos_token: String,
}

/// A model on the batch engine, ready to summarize.
pub struct BatchGenerator {
    tokenizer: Arc<Tokenizer>,
    /// Prompts go in as the user turn of this template; raw without one.
    chat: Option<Chat>,
    name: String,
    /// The engine's inbox; the engine thread ends when this is dropped.
    queue: Sender<Pending>,
    family: &'static str,
    context_length: Option<usize>,
    counters: Arc<EngineCounters>,
    /// The tokens whose text holds a line break ([`Form::line_ends`]), found on the
    /// first form.
    line_ends: OnceLock<Arc<HashSet<u32>>>,
}

/// What the engine thread has done, read by [`Generator::engine_stats`].
#[derive(Debug, Default)]
struct EngineCounters {
    prefills: AtomicU64,
    steps: AtomicU64,
}

/// A request waiting for the engine.
struct Pending {
    prompt: Vec<u32>,
    request: GenerationRequest,
    /// What its answer is restricted to.
    constraint: Option<Constraint>,
    started: Instant,
    reply: oneshot::Sender<Result<Generation, GeneratorError>>,
}

/// What an answer is restricted to.
enum Constraint {
    /// One of a list of labels ([`Generator::choose`]).
    Labels(Labels),
    /// A form's lines ([`Generator::fill`]).
    Form(Form),
}

impl Constraint {
    fn labels(&self) -> Option<&Labels> {
        match self {
            Constraint::Labels(labels) => Some(labels),
            Constraint::Form(_) => None,
        }
    }
}

/// A form an answer fills in: the engine writes each field's heading, the model each
/// value, up to a line end.
struct Form {
    names: Arc<[String]>,
    /// Each field's heading, tokenized: `name:` for the first, `\nname:` for the others.
    headings: Vec<Vec<u32>>,
    /// Tokens whose text holds a line break: the model ending a value (the token's text
    /// is left out of it).
    line_ends: Arc<HashSet<u32>>,
    max_value_tokens: usize,
}

/// Where a sequence is in its form.
struct FormState {
    /// The field being written.
    field: usize,
    /// Tokens of its heading still to write.
    heading: VecDeque<u32>,
    /// Where its value starts in `generated`.
    value_start: usize,
    /// The finished values' tokens, as spans of `generated`.
    values: Vec<Range<usize>>,
}

impl FormState {
    fn new(form: &Form) -> Self {
        Self {
            field: 0,
            heading: form.headings.first().cloned().unwrap_or_default().into(),
            value_start: 0,
            values: Vec::new(),
        }
    }

    /// Takes the model's `next` token (or the heading's, which it replaces) into
    /// `generated`; true once the last value has ended.
    fn advance(
        &mut self,
        form: &Form,
        generated: &mut Vec<u32>,
        next: u32,
        end: Option<u32>,
    ) -> bool {
        if let Some(forced) = self.heading.pop_front() {
            generated.push(forced);
            self.value_start = generated.len();
            return false;
        }
        let line_end = Some(next) == end || form.line_ends.contains(&next);
        if !line_end {
            generated.push(next);
        }
        if !line_end && generated.len() - self.value_start < form.max_value_tokens {
            return false;
        }
        self.values.push(self.value_start..generated.len());
        self.field += 1;
        let Some(heading) = form.headings.get(self.field) else {
            return true;
        };
        // The next heading's first token goes in where the model ended the line.
        self.heading = heading.iter().copied().collect();
        if let Some(first) = self.heading.pop_front() {
            generated.push(first);
        }
        self.value_start = generated.len();
        false
    }
}

/// Labels an answer must be one of, with their tokens.
struct Labels {
    texts: Arc<[String]>,
    tokens: Vec<Vec<u32>>,
}

impl Labels {
    /// The tokens that may follow `generated`: the next token of every label it starts,
    /// and `end` once it is a whole label.
    fn allowed(&self, generated: &[u32], end: Option<u32>) -> Vec<u32> {
        let mut allowed: Vec<u32> = self
            .tokens
            .iter()
            .filter(|l| l.len() > generated.len() && l.starts_with(generated))
            .map(|l| l[generated.len()])
            .collect();
        if let Some(end) = end
            && self.tokens.iter().any(|l| l == generated)
        {
            allowed.push(end);
        }
        allowed
    }

    /// The label `generated` spells, if it is one.
    fn spelled(&self, generated: &[u32]) -> Option<&str> {
        let at = self.tokens.iter().position(|l| l == generated)?;
        self.texts.get(at).map(String::as_str)
    }

    /// Whether `generated` is a whole label that no longer label continues.
    fn complete(&self, generated: &[u32]) -> bool {
        self.spelled(generated).is_some()
            && !self
                .tokens
                .iter()
                .any(|l| l.len() > generated.len() && l.starts_with(generated))
    }
}

/// A sequence in the batch.
struct Running {
    pending: Pending,
    cache: SequenceCache,
    generated: Vec<u32>,
    /// Where it is in its form, when it fills one in.
    form: Option<FormState>,
    /// Why the sequence failed, once it has.
    failed: Option<String>,
}

impl BatchGenerator {
    /// Whether prompts go in as the user turn of a chat template.
    pub fn is_chat(&self) -> bool {
        self.chat.is_some()
    }

    /// Starts the engine thread over a loaded model (the models' `load_*` constructors).
    pub(crate) fn start<M: BatchModel>(
        model: M,
        tokenizer: Tokenizer,
        chat: Option<Chat>,
        max_batch: usize,
        paged: Option<PagedKv>,
        name: String,
    ) -> Result<Self, GeneratorError> {
        let tokenizer = Arc::new(tokenizer);
        let (queue, inbox) = mpsc::channel();
        let counters = Arc::new(EngineCounters::default());
        let engine = Engine {
            model,
            tokenizer: Arc::clone(&tokenizer),
            max_batch,
            paged,
            counters: Arc::clone(&counters),
            step_times: StepTimes::default(),
        };
        let family = engine.model.family();
        let context_length = engine.model.context_length();
        std::thread::Builder::new()
            .name(format!("abridge-{}", family.to_lowercase()))
            .spawn(move || engine.run(inbox))
            .map_err(|e| GeneratorError::Load {
                model: name.clone(),
                reason: format!("starting the engine thread: {e}"),
            })?;
        Ok(Self {
            tokenizer,
            chat,
            name,
            queue,
            family,
            context_length,
            counters,
            line_ends: OnceLock::new(),
        })
    }

    /// The tokens whose text holds a line break.
    fn line_ends(&self) -> Arc<HashSet<u32>> {
        let found = self.line_ends.get_or_init(|| {
            let vocab = self.tokenizer.get_vocab_size(true) as u32;
            let ends = (0..vocab)
                .filter(|&id| {
                    self.tokenizer
                        .decode(&[id], false)
                        .is_ok_and(|text| text.contains('\n'))
                })
                .collect();
            Arc::new(ends)
        });
        Arc::clone(found)
    }

    /// `text`'s tokens, none of them special; refused when there are none.
    fn tokens(&self, text: &str, what: &str) -> Result<Vec<u32>, GeneratorError> {
        let ids = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| GeneratorError::Request(format!("tokenizer: {e}")))?
            .get_ids()
            .to_vec();
        match ids.is_empty() {
            true => Err(GeneratorError::Request(format!(
                "the {what} {text:?} has no tokens"
            ))),
            false => Ok(ids),
        }
    }

    /// The engine's answer to a submitted request.
    fn answer(
        &self,
        submitted: Result<oneshot::Receiver<Result<Generation, GeneratorError>>, GeneratorError>,
    ) -> BoxFuture<'_, Result<Generation, GeneratorError>> {
        Box::pin(async move {
            submitted?.await.map_err(|_| {
                GeneratorError::Request(format!(
                    "the {} engine dropped the request (an engine error; later requests are \
                     served)",
                    self.family
                ))
            })?
        })
    }

    fn submit(
        &self,
        request: GenerationRequest,
        constraint: Option<Constraint>,
    ) -> Result<oneshot::Receiver<Result<Generation, GeneratorError>>, GeneratorError> {
        let started = Instant::now();
        let text = match &self.chat {
            Some(chat) => render_chat(
                &chat.template,
                &request.prompt,
                &chat.bos_token,
                &chat.eos_token,
            )
            .map_err(GeneratorError::Request)?,
            None => request.prompt.clone(),
        };
        let prompt = self
            .tokenizer
            .encode(text.as_str(), true)
            .map_err(|e| GeneratorError::Request(format!("tokenizer: {e}")))?
            .get_ids()
            .to_vec();
        if prompt.is_empty() {
            return Err(GeneratorError::Request("the prompt has no tokens".into()));
        }
        if let Some(context) = self.context_length
            && prompt.len() + request.sampling.max_new_tokens > context
        {
            return Err(GeneratorError::Request(format!(
                "the prompt's {} tokens and up to {} new ones exceed the model's context of \
                 {context} tokens: lower max_input_tokens",
                prompt.len(),
                request.sampling.max_new_tokens
            )));
        }
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            prompt,
            request,
            constraint,
            started,
            reply,
        };
        self.queue.send(pending).map_err(|_| {
            GeneratorError::EngineGone(format!("the {} engine thread ended", self.family))
        })?;
        Ok(answer)
    }
}

impl Generator for BatchGenerator {
    fn model(&self) -> &str {
        &self.name
    }

    fn generate(
        &self,
        request: GenerationRequest,
    ) -> BoxFuture<'_, Result<Generation, GeneratorError>> {
        let answer = self.submit(request, None);
        self.answer(answer)
    }

    fn choose(
        &self,
        prompt: String,
        labels: Arc<[String]>,
    ) -> BoxFuture<'_, Result<Generation, GeneratorError>> {
        let tokens: Result<Vec<Vec<u32>>, GeneratorError> = labels
            .iter()
            .map(|label| self.tokens(label, "label"))
            .collect();
        let answer = tokens.and_then(|tokens| {
            // Greedy, and room for the longest label and the end of sequence.
            let longest = tokens.iter().map(Vec::len).max().unwrap_or(0);
            let request = GenerationRequest::greedy(prompt, longest + 1);
            self.submit(
                request,
                Some(Constraint::Labels(Labels {
                    texts: labels,
                    tokens,
                })),
            )
        });
        self.answer(answer)
    }

    fn fill(
        &self,
        prompt: String,
        fields: Arc<[String]>,
        max_value_tokens: usize,
    ) -> BoxFuture<'_, Result<Generation, GeneratorError>> {
        let headings: Result<Vec<Vec<u32>>, GeneratorError> = fields
            .iter()
            .enumerate()
            .map(|(i, name)| match i {
                0 => self.tokens(&format!("{name}:"), "field"),
                _ => self.tokens(&format!("\n{name}:"), "field"),
            })
            .collect();
        let answer = headings.and_then(|headings| {
            let max_value_tokens = max_value_tokens.max(1);
            let written: usize = headings.iter().map(Vec::len).sum();
            let request =
                GenerationRequest::greedy(prompt, written + fields.len() * max_value_tokens);
            let form = Form {
                names: fields,
                headings,
                line_ends: self.line_ends(),
                max_value_tokens,
            };
            self.submit(request, Some(Constraint::Form(form)))
        });
        self.answer(answer)
    }

    fn engine_stats(&self) -> Option<EngineStats> {
        Some(EngineStats {
            prefills: self.counters.prefills.load(Ordering::Relaxed),
            steps: self.counters.steps.load(Ordering::Relaxed),
        })
    }

    fn truncate(
        &self,
        text: String,
        max_tokens: usize,
    ) -> BoxFuture<'_, Result<Head, GeneratorError>> {
        let tokenizer = Arc::clone(&self.tokenizer);
        Box::pin(async move {
            let encoding = tokenizer
                .encode(text.as_str(), false)
                .map_err(|e| GeneratorError::Request(format!("tokenizer: {e}")))?;
            if encoding.len() <= max_tokens {
                return Ok(Head::whole(text));
            }
            // The text up to the end of the last token that fits.
            let end = encoding
                .get_offsets()
                .get(max_tokens.saturating_sub(1))
                .map_or(0, |&(_, end)| end);
            Ok(Head {
                text: text.get(..end).unwrap_or_default().to_string(),
                cut_tokens: encoding.len() - max_tokens,
            })
        })
    }
}

/// The model and its decoding loop, owned by the engine thread.
struct Engine<M> {
    model: M,
    tokenizer: Arc<Tokenizer>,
    max_batch: usize,
    /// The block pool of the keys and values, when attention is paged.
    paged: Option<PagedKv>,
    counters: Arc<EngineCounters>,
    /// Where decoding steps' time went, when they are timed (`ABRIDGE_STEP_TIMES`).
    step_times: StepTimes,
}

/// The parts of decoding steps, summed over the steps since the last report: the
/// forward pass (attention included, and counted apart), picking the next tokens, and
/// the engine's own bookkeeping (advancing, answering, freeing).
#[derive(Debug, Default)]
struct StepTimes {
    steps: u64,
    rows: u64,
    forward: Duration,
    attention: Duration,
    sampling: Duration,
    host: Duration,
}

impl StepTimes {
    /// Adds a step; every `every` steps, prints the split and starts over.
    fn add(&mut self, family: &str, every: u64, rows: usize, parts: [Duration; 4]) {
        let [forward, attention, sampling, host] = parts;
        self.steps += 1;
        self.rows += rows as u64;
        self.forward += forward;
        self.attention += attention;
        self.sampling += sampling;
        self.host += host;
        if self.steps < every {
            return;
        }
        let per_step = |d: Duration| d.as_secs_f64() * 1e3 / self.steps as f64;
        eprintln!(
            "abridge {family} engine: {} steps, {:.1} sequences each: {:.2} ms per step = \
             forward {:.2} (attention {:.2}) + sampling {:.2} + host {:.2}",
            self.steps,
            self.rows as f64 / self.steps as f64,
            per_step(self.forward + self.sampling + self.host),
            per_step(self.forward),
            per_step(self.attention),
            per_step(self.sampling),
            per_step(self.host),
        );
        *self = Self::default();
    }
}

/// What picking a sequence's next token needs to know.
struct Draw<'a> {
    request: &'a GenerationRequest,
    generated: &'a [u32],
    labels: Option<&'a Labels>,
    /// The token the engine writes itself (a form's heading), whatever the logits.
    forced: Option<u32>,
}

/// Each row's argmax of `logits` `(rows, vocab)`, `None` where the row holds a NaN,
/// worked out where the logits are: on a GPU a row of logits is a megabyte (BLOOM's
/// 250,880 words) to copy to the host per token; only the argmax and a sum (NaN when a
/// logit is) cross, for the whole batch in one copy: one host sync per step. Token ids
/// are exact in f32 (below 2^24).
fn greedy_in_place(logits: &Tensor) -> candle_core::Result<Vec<Option<u32>>> {
    let logits = logits.to_dtype(DType::F32)?;
    let best = logits.argmax_keepdim(D::Minus1)?.to_dtype(DType::F32)?;
    let sums = logits.sum_keepdim(D::Minus1)?;
    let picked = Tensor::cat(&[best, sums], D::Minus1)?.to_vec2::<f32>()?;
    Ok(picked
        .into_iter()
        .map(|row| match row[..] {
            [best, sum] if !sum.is_nan() => Some(best as u32),
            _ => None,
        })
        .collect())
}

/// Prompts joining the batch, each with its blocks when attention is paged.
type Group = Vec<(Pending, Option<BlockTable>)>;

impl<M: BatchModel> Engine<M> {
    /// Serves requests until every sender is gone and the last sequence has finished.
    fn run(mut self, inbox: Receiver<Pending>) {
        let mut waiting: VecDeque<Pending> = VecDeque::new();
        let mut running: Vec<Running> = Vec::new();
        let mut open = true;
        loop {
            if running.is_empty() {
                // Also takes back the blocks of sequences an engine panic dropped.
                if let Some(kv) = &mut self.paged {
                    kv.pool.reset();
                }
                if waiting.is_empty() {
                    match inbox.recv() {
                        Ok(pending) => waiting.push_back(pending),
                        Err(_) => return,
                    }
                    // Requests come in bursts (a batch of rows): an idle engine waits a
                    // moment for the rest so that they are prefilled as one batch, not
                    // the first alone (a 128-token prompt alone took 1.2 s on the 560m
                    // shape, eight together 0.6 s each).
                    let deadline = Instant::now() + GATHER;
                    while waiting.len() < self.max_batch {
                        let left = deadline.saturating_duration_since(Instant::now());
                        match inbox.recv_timeout(left) {
                            Ok(pending) => waiting.push_back(pending),
                            Err(_) => break,
                        }
                    }
                }
            }
            while open {
                match inbox.try_recv() {
                    Ok(pending) => waiting.push_back(pending),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            let joining = self.take(&mut waiting, running.len());
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
                for mut sequence in running.drain(..) {
                    sequence.failed = Some(format!(
                        "{} engine error ({why}); the engine restarted its batch",
                        self.model.family()
                    ));
                    self.finish(sequence);
                }
            }
        }
    }

    /// The waiting prompts that join the batch now: while it has room and, with paged
    /// attention, while the pool has the blocks for a prompt and its longest answer (a
    /// prompt that could never fit fails; one that does not fit yet waits for blocks).
    fn take(&mut self, waiting: &mut VecDeque<Pending>, running: usize) -> Group {
        let mut group = Vec::new();
        while running + group.len() < self.max_batch {
            let Some(next) = waiting.front() else { break };
            let table = match &mut self.paged {
                None => None,
                Some(kv) => {
                    let tokens = next.prompt.len() + next.request.sampling.max_new_tokens;
                    let needed = kv.pool.blocks_for(tokens);
                    if needed > kv.pool.total() {
                        let reason = format!(
                            "the prompt and its answer need {tokens} tokens of KV cache \
                             ({needed} blocks), the cache holds {} blocks: raise \
                             summarize.paged_attention.gpu_memory_mb, or lower \
                             max_input_tokens or max_new_tokens",
                            kv.pool.total()
                        );
                        if let Some(pending) = waiting.pop_front() {
                            let _ = pending.reply.send(Err(GeneratorError::Request(reason)));
                        }
                        continue;
                    }
                    match kv.pool.reserve(tokens) {
                        Some(table) => Some(table),
                        None => break,
                    }
                }
            };
            if let Some(pending) = waiting.pop_front() {
                group.push((pending, table));
            }
        }
        group
    }

    /// Prefills new sequences together and picks their first tokens; returns those that
    /// go on (the others are answered: failed, or finished after one token). When the
    /// group's prefill fails, each prompt is tried alone, so that one bad prompt fails
    /// only its own row.
    fn admit(&mut self, group: Group) -> Vec<Running> {
        self.counters.prefills.fetch_add(1, Ordering::Relaxed);
        let prompts: Vec<(&[u32], usize)> = group
            .iter()
            .map(|(p, _)| (p.prompt.as_slice(), p.request.sampling.max_new_tokens))
            .collect();
        let tables: Vec<BlockTable> = group.iter().filter_map(|(_, t)| t.clone()).collect();
        let draws: Vec<Draw<'_>> = group
            .iter()
            .map(|(p, _)| Draw {
                request: &p.request,
                generated: &[],
                labels: p.constraint.as_ref().and_then(Constraint::labels),
                forced: match &p.constraint {
                    Some(Constraint::Form(form)) => {
                        form.headings.first().and_then(|h| h.first()).copied()
                    }
                    _ => None,
                },
            })
            .collect();
        let paged = self.paged.as_mut().map(|kv| (kv, tables.as_slice()));
        let prefilled = self
            .model
            .prefill(&prompts, paged)
            .and_then(|(logits, caches)| Ok((self.next_tokens(&draws, &logits)?, caches)));
        let (next, caches) = match prefilled {
            Ok(prefilled) => prefilled,
            Err(_) if group.len() > 1 => {
                return group
                    .into_iter()
                    .flat_map(|one| self.admit(vec![one]))
                    .collect();
            }
            Err(e) => {
                for (pending, table) in group {
                    self.release(table);
                    let _ = pending.reply.send(Err(GeneratorError::Request(format!(
                        "{}: {e}",
                        self.model.family()
                    ))));
                }
                return Vec::new();
            }
        };
        let mut going_on = Vec::with_capacity(group.len());
        for (((pending, _), cache), next) in group.into_iter().zip(caches).zip(next) {
            let form = match &pending.constraint {
                Some(Constraint::Form(form)) => Some(FormState::new(form)),
                _ => None,
            };
            let mut sequence = Running {
                pending,
                cache,
                generated: Vec::new(),
                form,
                failed: None,
            };
            if sequence.pending.request.sampling.max_new_tokens == 0
                || self.advance(&mut sequence, next)
            {
                self.finish(sequence);
            } else {
                going_on.push(sequence);
            }
        }
        going_on
    }

    /// Feeds every running sequence its newest token and picks the next; finished
    /// sequences are answered and leave. A failed step fails the sequences in it (their
    /// rows record why) and the engine goes on with the next requests.
    fn step(&mut self, running: &mut Vec<Running>) {
        self.counters.steps.fetch_add(1, Ordering::Relaxed);
        fail::fail_point!("batch::step");
        let tokens: Vec<u32> = running
            .iter()
            .map(|s| s.generated.last().copied().unwrap_or_default())
            .collect();
        let timing = attention::step_times();
        let started = Instant::now();
        let attention_before = attention::ATTENTION_NANOS.load(Ordering::Relaxed);
        let logits = {
            let mut caches: Vec<&mut SequenceCache> =
                running.iter_mut().map(|s| &mut s.cache).collect();
            self.model
                .decode_step(&tokens, &mut caches, self.paged.as_mut())
        };
        if timing.is_some()
            && let Ok(logits) = &logits
            && !logits.device().is_cpu()
        {
            let _ = logits.device().synchronize();
        }
        let forward = started.elapsed();
        let attention_nanos = attention::ATTENTION_NANOS.load(Ordering::Relaxed) - attention_before;
        let rows = running.len();
        let draws: Vec<Draw<'_>> = running
            .iter()
            .map(|s| Draw {
                request: &s.pending.request,
                generated: &s.generated,
                labels: s.pending.constraint.as_ref().and_then(Constraint::labels),
                forced: s.form.as_ref().and_then(|f| f.heading.front().copied()),
            })
            .collect();
        let next = logits.and_then(|logits| self.next_tokens(&draws, &logits));
        let sampling = started.elapsed() - forward;
        let next = match next {
            Ok(next) => next,
            Err(e) => {
                for mut sequence in running.drain(..) {
                    sequence.failed = Some(format!("{} decoding step: {e}", self.model.family()));
                    self.finish(sequence);
                }
                return;
            }
        };
        let mut still = Vec::with_capacity(running.len());
        for (mut sequence, next) in running.drain(..).zip(next) {
            if self.advance(&mut sequence, next) {
                self.finish(sequence);
            } else {
                still.push(sequence);
            }
        }
        *running = still;
        if let Some(every) = timing {
            let host = started.elapsed() - forward - sampling;
            let attention = Duration::from_nanos(attention_nanos);
            let parts = [forward, attention, sampling, host];
            let family = self.model.family();
            self.step_times.add(family, every, rows, parts);
        }
    }

    /// The next token of each row of `logits` `(rows, vocab)`, drawn for its request at
    /// its generated position; `None` where the row is NaN (broken weights or an
    /// overflow), which fails that row rather than decode garbage.
    fn next_tokens(
        &self,
        draws: &[Draw<'_>],
        logits: &Tensor,
    ) -> candle_core::Result<Vec<Option<u32>>> {
        let greedy = draws.iter().all(|d| {
            d.request.sampling.temperature <= 0.0 && d.labels.is_none() && d.forced.is_none()
        });
        if greedy && !logits.device().is_cpu() {
            return greedy_in_place(logits);
        }
        let rows = logits.to_vec2::<f32>()?;
        let end = self.model.eos_token_id();
        Ok(rows
            .iter()
            .zip(draws)
            .map(|(row, draw)| {
                if row.iter().any(|l| l.is_nan()) {
                    return None;
                }
                if draw.forced.is_some() {
                    return draw.forced;
                }
                if let Some(labels) = draw.labels {
                    // The most likely of the tokens that keep the answer a label.
                    let allowed = labels.allowed(draw.generated, end);
                    return allowed.into_iter().max_by(|&a, &b| {
                        let logit = |t: u32| row.get(t as usize).copied().unwrap_or(f32::MIN);
                        logit(a).total_cmp(&logit(b)).then(b.cmp(&a))
                    });
                }
                let sampling = &draw.request.sampling;
                let position = draw.generated.len() as u64;
                let uniform = uniform_draw(sampling.seed, draw.request.key, position);
                Some(pick_token(row, sampling.temperature, sampling.top_p, uniform) as u32)
            })
            .collect())
    }

    /// Takes `next` into `sequence`; true when the sequence is done (end of sequence,
    /// `max_new_tokens` reached, or NaN logits).
    fn advance(&self, sequence: &mut Running, next: Option<u32>) -> bool {
        let Some(next) = next else {
            sequence.failed = Some(format!(
                "{}: the model's logits are NaN at generated token {}",
                self.model.family(),
                sequence.generated.len() + 1
            ));
            return true;
        };
        let end = self.model.eos_token_id();
        if let (Some(state), Some(Constraint::Form(form))) =
            (&mut sequence.form, &sequence.pending.constraint)
        {
            return state.advance(form, &mut sequence.generated, next, end);
        }
        if Some(next) == end {
            return true;
        }
        sequence.generated.push(next);
        if let Some(Constraint::Labels(labels)) = &sequence.pending.constraint
            && labels.complete(&sequence.generated)
        {
            return true;
        }
        sequence.generated.len() >= sequence.pending.request.sampling.max_new_tokens
    }

    fn release(&mut self, table: Option<BlockTable>) {
        if let (Some(kv), Some(table)) = (&mut self.paged, table) {
            kv.pool.release(table);
        }
    }

    /// Answers a sequence that is done and gives its blocks back.
    fn finish(&mut self, sequence: Running) {
        let Running {
            pending,
            cache,
            generated,
            form,
            failed,
        } = sequence;
        self.release(cache.into_blocks());
        if let Some(reason) = failed {
            let _ = pending.reply.send(Err(GeneratorError::Request(reason)));
            return;
        }
        let decode = |tokens: &[u32]| {
            self.tokenizer
                .decode(tokens, true)
                .map_err(|e| GeneratorError::Request(format!("tokenizer: {e}")))
        };
        let text = match (&pending.constraint, form) {
            (Some(Constraint::Labels(labels)), _) => labels
                .spelled(&generated)
                .map(str::to_string)
                .ok_or_else(|| {
                    GeneratorError::Request("the answer stopped before a whole label".into())
                }),
            (Some(Constraint::Form(form)), Some(state)) => form
                .names
                .iter()
                .zip(&state.values)
                .map(|(name, span)| {
                    let value = decode(generated.get(span.clone()).unwrap_or_default())?;
                    // A model that writes the heading again, after the engine's.
                    let value = value.trim();
                    let value = value
                        .strip_prefix(&format!("{name}:"))
                        .unwrap_or(value)
                        .trim();
                    Ok(format!("{name}: {}", before_headings(value, &form.names)))
                })
                .collect::<Result<Vec<_>, GeneratorError>>()
                .map(|lines| lines.join("\n")),
            _ => decode(&generated),
        };
        let answer = text.map(|text| Generation {
            text,
            prompt_tokens: pending.prompt.len(),
            completion_tokens: generated.len(),
            latency: pending.started.elapsed(),
        });
        let _ = pending.reply.send(answer);
    }
}

/// `value` up to where the model starts another field on the same line (`Toronto branch,
/// location: second floor`: Qwen2.5 writes the whole form on the first line), without the
/// separator before it.
fn before_headings<'a>(value: &'a str, names: &[String]) -> &'a str {
    let end = names
        .iter()
        .flat_map(|name| [format!("{name}:"), format!("{name}：")])
        .filter_map(|heading| value.find(&heading))
        .min()
        .unwrap_or(value.len());
    value[..end].trim_end_matches([',', ';', '，', '；', '、', ' '])
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use candle_core::Device;

    use super::*;
    use crate::Precision;
    use crate::generator::{PagedAttention, Sampling};
    use crate::models::bloom::Bloom;

    /// The device-side greedy pick: the first maximum of each row (as transformers), and
    /// no token for a row with a NaN.
    #[test]
    fn greedy_in_place_picks_each_rows_first_maximum_and_refuses_nan() -> candle_core::Result<()> {
        let rows = [
            [0.5f32, 2.0, 2.0, -1.0],
            [f32::NAN, 1.0, 0.0, 0.0],
            [-3.0, -2.0, -9.0, -2.5],
        ];
        let logits = Tensor::new(&rows, &Device::Cpu)?;
        assert_eq!(greedy_in_place(&logits)?, [Some(1), None, Some(1)]);
        let half = greedy_in_place(&logits.to_dtype(DType::F16)?)?;
        assert_eq!(half, [Some(1), None, Some(1)]);
        Ok(())
    }

    #[test]
    fn a_value_ends_where_the_model_starts_another_field() {
        let names = ["device".to_string(), "location".to_string()];
        assert_eq!(
            before_headings("Toronto branch, location: second floor", &names),
            "Toronto branch"
        );
        assert_eq!(before_headings("printer; device：HP", &names), "printer");
        assert_eq!(before_headings("ThinkPad T14", &names), "ThinkPad T14");
        assert_eq!(before_headings("location: x", &names), "");
    }

    fn fixture() -> (BatchGenerator, serde_json::Value, std::path::PathBuf) {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/bloom-tiny-4h");
        let generator = BatchGenerator::load_bloom(
            &dir,
            &Device::Cpu,
            4,
            &PagedAttention::default(),
            Precision::Auto,
        )
        .expect("fixture model");
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

    /// Both tiny random BLOOMs (4 and 6 heads) on the batch engine, four in flight.
    fn tiny_blooms() -> Vec<BatchGenerator> {
        ["bloom-tiny-4h", "bloom-tiny-6h"]
            .iter()
            .map(|fixture| {
                let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../tests/fixtures")
                    .join(fixture);
                BatchGenerator::load_bloom(
                    &dir,
                    &Device::Cpu,
                    4,
                    &PagedAttention::default(),
                    Precision::Auto,
                )
                .expect("fixture model")
            })
            .collect()
    }

    /// Labels that share first tokens, a label inside another, Chinese and English: the
    /// answer is always one of them, whatever the text, on both tiny BLOOMs.
    #[test]
    fn choose_always_answers_a_listed_label() {
        use proptest::prelude::*;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        for generator in tiny_blooms() {
            let pool = [
                "printing",
                "print",
                "printer offline",
                "email",
                "网络",
                "网络连接",
                "账户",
                "billing",
            ];
            let labels = prop::sample::subsequence(pool.to_vec(), 1..=pool.len());
            let config = proptest::test_runner::Config::with_cases(24);
            proptest!(config, |(text in "[a-z 打印机网络]{0,40}", labels in labels)| {
                let labels: Arc<[String]> = labels.iter().map(|l| l.to_string()).collect();
                let prompt = format!("输入: {text}\n分类: {}\n输出: [GEN]", labels.join(","));
                let answer = runtime
                    .block_on(generator.choose(prompt, Arc::clone(&labels)))
                    .expect("an answer");
                prop_assert!(labels.contains(&answer.text), "{:?} not in {labels:?}", answer.text);
                prop_assert!(answer.completion_tokens >= 1);
            });
        }
    }

    /// A form is always filled in whole: one `name: value` line per field, in order,
    /// each value within its budget and on one line, whatever the text (on the tiny
    /// BLOOMs, whose values are noise).
    #[test]
    fn fill_answers_every_field_in_order() {
        use proptest::prelude::*;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        for generator in tiny_blooms() {
            let pool = ["device", "location", "设备", "地点", "error code"];
            let fields = prop::sample::subsequence(pool.to_vec(), 1..=pool.len());
            let config = proptest::test_runner::Config::with_cases(24);
            proptest!(config, |(text in "[a-z 打印机网络\n]{0,40}", fields in fields, budget in 1usize..6)| {
                let fields: Arc<[String]> = fields.iter().map(|f| f.to_string()).collect();
                let prompt = format!("输入: {text}\n抽取: {}\n输出: [GEN]", fields.join(","));
                let answer = runtime
                    .block_on(generator.fill(prompt, Arc::clone(&fields), budget))
                    .expect("an answer");
                let lines: Vec<&str> = answer.text.split('\n').collect();
                prop_assert_eq!(lines.len(), fields.len(), "{:?}", answer.text);
                for (line, field) in lines.iter().zip(fields.iter()) {
                    prop_assert!(line.starts_with(&format!("{field}:")), "{:?}", answer.text);
                }
                let headings: usize = fields
                    .iter()
                    .enumerate()
                    .map(|(i, f)| {
                        let heading = if i == 0 { format!("{f}:") } else { format!("\n{f}:") };
                        generator.tokens(&heading, "field").map(|t| t.len()).unwrap_or(0)
                    })
                    .sum();
                prop_assert!(answer.completion_tokens >= headings);
                prop_assert!(answer.completion_tokens <= headings + fields.len() * budget);
            });
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
        let own = PagedAttention::default();
        let serial = BatchGenerator::load_bloom(&dir, &Device::Cpu, 1, &own, Precision::Auto)
            .expect("model");
        let batched = BatchGenerator::load_bloom(&dir, &Device::Cpu, 3, &own, Precision::Auto)
            .expect("model");
        // The same batch with its keys and values in the blocks of a pool: one large
        // enough for all (the job file's way), and one of 12 blocks of 4 tokens, where
        // prompts wait for the blocks of finished sequences, and a prompt longer than the
        // whole pool fails alone.
        let pool = PagedAttention {
            enabled: Some(true),
            gpu_memory_mb: Some(1),
            block_size: Some(8),
            ..PagedAttention::default()
        };
        let paged = BatchGenerator::load_bloom(&dir, &Device::Cpu, 3, &pool, Precision::Auto)
            .expect("model");
        let model = Bloom::load(&dir, &Device::Cpu).expect("model");
        let config = model.config().clone();
        let small = PagedKv::new(
            12,
            4,
            config.n_layer,
            config.hidden_size / config.n_head,
            crate::models::bloom::alibi_slopes(config.n_head),
            DType::F32,
            &Device::Cpu,
        )
        .expect("pool");
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).expect("tokenizer");
        let scarce = BatchGenerator::start(model, tokenizer, None, 3, Some(small), "scarce".into())
            .expect("engine");
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
        let too_long = 12 * 4 + 1 - one_by_one[4].prompt_tokens;
        for (name, engine) in [
            ("batched", &batched),
            ("paged", &paged),
            ("scarce", &scarce),
        ] {
            let together = engine.generate_batch(requests.clone()).await;
            for (i, ((a, b), r)) in one_by_one.iter().zip(together).zip(&requests).enumerate() {
                let b = b.unwrap_or_else(|e| panic!("{name} {i}: {e}"));
                assert_eq!(
                    (&a.text, a.completion_tokens),
                    (&b.text, b.completion_tokens),
                    "{name} {i}"
                );
                assert!(b.completion_tokens <= r.sampling.max_new_tokens);
            }
        }
        assert!(one_by_one.iter().any(|g| g.completion_tokens > 3));
        let mut long = requests[4].clone();
        long.sampling.max_new_tokens = too_long;
        let err = scarce.generate(long).await.expect_err("more than the pool");
        assert!(err.to_string().contains("12 blocks"), "{err}");
        // The engine goes on.
        let again = scarce.generate(requests[0].clone()).await.expect("answer");
        assert_eq!(again.text, one_by_one[0].text);
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
        let generator = BatchGenerator::load_bloom(
            copy.path(),
            &Device::Cpu,
            2,
            &PagedAttention::default(),
            Precision::Auto,
        )
        .expect("model");
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
        assert_eq!(all, Head::whole(text.clone()));
        let head = generator.truncate(text.clone(), 3).await.expect("cut");
        assert!(
            text.starts_with(&head.text) && head.text.len() < text.len(),
            "{head:?}"
        );
        let count = |t: &str| generator.tokenizer.encode(t, false).expect("encode").len();
        assert!(count(&head.text) <= 3, "{head:?}");
        assert_eq!(head.cut_tokens, count(&text) - 3, "{head:?}");
    }
}
