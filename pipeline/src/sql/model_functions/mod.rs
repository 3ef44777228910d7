//! Model calls inside SQL (`abridge sql --job JOB`): `summarize(text [, prompt])`,
//! `embed(text)`, `classify(text, labels)` and `extract_fields(text, 'a, b')` with the
//! job's models, and their `try_` forms, which return `{result, error}` so that a query
//! can see why a row failed.
//!
//! They are DataFusion async scalar functions ([`AsyncScalarUDFImpl`]): the planner puts
//! an `AsyncFuncExec` under the projection or filter that calls them and hands each one a
//! whole batch of rows, which goes to the engines a run uses: the summarize stage (its
//! window of `in_flight` requests open at the batch engine) and the encoder worker (in the
//! job's `embed.batch_size`). A physical operator of our own would batch the same way with
//! more code; a function also composes with every SQL construct (WHERE, GROUP BY, nesting)
//! and with the planner's limit pushdown, so `... LIMIT 256` calls the model 256 times.
//!
//! Answers are cached by (function, model fingerprint, prompt version, input text) in a
//! [`ResultCache`]: a second run of a query calls no model. Before a query calls any
//! model, [`ModelFunctions::begin_count`] lets it run once with the functions answering
//! NULL and counting the distinct uncached inputs, so that a query over too many rows is
//! refused (`--max-model-rows`) before the first call.
//!
//! The functions' DataFusion face is `udf.rs`; each family's calls are in their own module
//! (`summarize.rs`, `embed.rs`, `questions.rs` for classify and extract); what they share (the
//! session's models, the cache look-up that the guard's counting pass goes through, the
//! accounting) is here.

mod embed;
mod questions;
mod summarize;
mod udf;

use summarize::Summarizer;
use udf::{Kind, ModelFunction};

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use abridge_models::encoder::EncoderWorker;
use abridge_models::generator::{EngineStats, SharedGenerator};
use abridge_operators::OperatorError;
use abridge_operators::embed::EmbedConfig;
use abridge_operators::summarize::{SUMMARY, SummarizeConfig};
use abridge_operators::template::Template;
use arrow::array::{Array, AsArray, Float32Array, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Schema};
use datafusion::common::exec_datafusion_err;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::async_udf::AsyncScalarUDF;
use datafusion::logical_expr::{ScalarUDF, Signature, TypeSignature, Volatility};
use serde::Serialize;
use tokio::sync::OnceCell;

use super::result_cache::{Answer, Key, ResultCache, key};

/// The functions this module registers.
pub const NAMES: [&str; 8] = [
    "summarize",
    "try_summarize",
    "embed",
    "try_embed",
    "classify",
    "try_classify",
    "extract_fields",
    "try_extract_fields",
];

/// How model functions behave in a session (`abridge sql`'s flags).
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// Fail the query on the first row a model fails on, instead of NULL for that row.
    pub fail_on_error: bool,
    /// Most distinct uncached inputs one query may send to models; 0: no limit.
    pub max_model_rows: usize,
}

/// What the model functions did in a session: printed by `abridge sql` on stderr.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ModelAccounting {
    /// Inputs sent to a model.
    pub model_calls: u64,
    /// Inputs answered from the cache (an earlier query, or the job's committed run).
    pub cache_hits: u64,
    /// Inputs a model failed on (NULL in the result).
    pub failed: u64,
    /// The first failure's reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
    /// Prompt tokens of the summaries made (chat template included).
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
    /// Wall time of the model calls, loading not included.
    pub model_ms: u64,
    /// Prompt groups the batch engine prefilled, and its decoding steps (each step decodes
    /// one token of every sequence in its batch): rows that share steps were batched.
    pub engine_prefills: u64,
    pub engine_steps: u64,
}

/// The model functions of one session, over the job's `[summarize]` and `[embed]`.
#[derive(Clone)]
pub struct ModelFunctions {
    models: Arc<Models>,
}

struct Models {
    summarize: Option<SummarizeConfig>,
    embed: Option<EmbedConfig>,
    options: ModelOptions,
    cache: ResultCache,
    generator: OnceCell<SharedGenerator>,
    encoder: OnceCell<EncoderWorker>,
    /// The models' identities (`summarize`, `embed`): worked out once, before any load.
    identities: Mutex<HashMap<&'static str, String>>,
    /// A summarizer per prompt (None: the job's).
    summarizers: Mutex<HashMap<Option<String>, Arc<Summarizer>>>,
    /// On during the counting pass: functions answer from the cache or a stand-in, and
    /// count.
    counting: AtomicBool,
    /// Distinct uncached inputs the counting pass met.
    would_call: Mutex<HashSet<Key>>,
    /// Rows the counting pass answered from the cache, and rows it failed.
    counted_hits: AtomicU64,
    counted_failed: AtomicU64,
    accounting: Mutex<ModelAccounting>,
    /// The engine's counters when the session began calling it.
    engine_base: Mutex<Option<EngineStats>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl ModelFunctions {
    /// Functions over the job's sections (a function whose section is missing says so
    /// when called); `cache` keeps and reuses answers.
    pub fn new(
        summarize: Option<SummarizeConfig>,
        embed: Option<EmbedConfig>,
        options: ModelOptions,
        cache: ResultCache,
    ) -> Self {
        Self {
            models: Arc::new(Models {
                summarize,
                embed,
                options,
                cache,
                generator: OnceCell::new(),
                encoder: OnceCell::new(),
                identities: Mutex::default(),
                summarizers: Mutex::default(),
                counting: AtomicBool::new(false),
                would_call: Mutex::default(),
                counted_hits: AtomicU64::new(0),
                counted_failed: AtomicU64::new(0),
                accounting: Mutex::default(),
                engine_base: Mutex::default(),
            }),
        }
    }

    /// The functions, to register with a session.
    pub fn udfs(&self) -> Vec<ScalarUDF> {
        [
            (Kind::Summarize, false),
            (Kind::Summarize, true),
            (Kind::Embed, false),
            (Kind::Embed, true),
            (Kind::Classify, false),
            (Kind::Classify, true),
            (Kind::Extract, false),
            (Kind::Extract, true),
        ]
        .into_iter()
        .map(|(kind, detailed)| {
            let arities: &[usize] = match kind {
                Kind::Summarize => &[1, 2],
                Kind::Embed => &[1],
                Kind::Classify | Kind::Extract => &[2],
            };
            let signature = Signature::one_of(
                arities.iter().map(|&n| TypeSignature::Any(n)).collect(),
                // Never folded at planning: a literal argument still goes to the model
                // when the query runs, batched and counted like any other.
                Volatility::Volatile,
            );
            let function = ModelFunction {
                kind,
                detailed,
                signature,
                models: Arc::clone(&self.models),
            };
            AsyncScalarUDF::new(Arc::new(function)).into_scalar_udf()
        })
        .collect()
    }

    /// Whether answers are cached.
    pub fn caching(&self) -> bool {
        self.models.cache.enabled()
    }

    /// The columns of a committed run (of `schema`) that [`ModelFunctions::learn_committed`]
    /// reads: those the job's templates use, the answers and the row's error.
    pub fn committed_columns(&self, schema: &Schema) -> Vec<String> {
        let mut templates = Vec::new();
        if let Ok(summarizer) = self.models.summarizer(None) {
            templates.push(summarizer.settings.template.clone());
        }
        if let Some(embed) = &self.models.embed {
            templates.push(embed.input.clone().unwrap_or_else(|| "{text}".into()));
        }
        let parsed: Vec<Template> = templates
            .iter()
            .filter_map(|t| Template::parse(t, schema).ok())
            .collect();
        let answers = [
            SUMMARY,
            abridge_operators::embed::EMBEDDING,
            abridge_schemas::output::ERROR,
        ];
        schema
            .fields()
            .iter()
            .enumerate()
            .filter(|(i, f)| {
                answers.contains(&f.name().as_str()) || parsed.iter().any(|t| t.uses(*i))
            })
            .map(|(_, f)| f.name().clone())
            .collect()
    }

    /// Takes the answers of a committed run of the job (its rows, with the columns of
    /// [`ModelFunctions::committed_columns`]): each row's summary answers `summarize()` of
    /// the prompt the job made for it, and its
    /// vector `embed()` of the text the job embedded. Only for a run made with the job's
    /// present settings (the caller checks its fingerprint). A function whose input the
    /// run's columns cannot render (a template over columns a call does not have) learns
    /// nothing; the others still do.
    pub fn learn_committed(&self, batches: &[RecordBatch]) -> usize {
        batches
            .iter()
            .map(|batch| {
                let summaries = self.learn_summaries(batch).unwrap_or(0);
                summaries + self.learn_vectors(batch).unwrap_or(0)
            })
            .sum()
    }

    fn learn_summaries(&self, batch: &RecordBatch) -> Result<usize, OperatorError> {
        let models = &self.models;
        let (Some(config), Some(summaries)) = (&models.summarize, batch.column_by_name(SUMMARY))
        else {
            return Ok(0);
        };
        let summarizer = models.summarizer(None)?;
        let template = Template::parse(&summarizer.settings.template, &batch.schema())?;
        let fingerprint = models.generator_identity(config)?;
        let prompts = template.render(batch, &vec![true; batch.num_rows()])?;
        let summaries = cast(summaries, &DataType::Utf8)?;
        let summaries = summaries.as_string::<i32>();
        let mut learned = 0;
        for (row, prompt) in prompts.iter().enumerate() {
            if usable(batch, row) && summaries.is_valid(row) {
                let k = summarize_key(&fingerprint, &summarizer.version, prompt);
                let answer = Answer::Text(summaries.value(row).into());
                models.cache.know(k, answer);
                learned += 1;
            }
        }
        Ok(learned)
    }

    fn learn_vectors(&self, batch: &RecordBatch) -> Result<usize, OperatorError> {
        let models = &self.models;
        let vectors = batch.column_by_name(abridge_operators::embed::EMBEDDING);
        let (Some(config), Some(vectors)) = (&models.embed, vectors) else {
            return Ok(0);
        };
        let Some(vectors) = vectors.as_fixed_size_list_opt() else {
            return Ok(0);
        };
        let template =
            Template::parse(config.input.as_deref().unwrap_or("{text}"), &batch.schema())?;
        let fingerprint = models.encoder_identity(config)?;
        let texts = template.render(batch, &vec![true; batch.num_rows()])?;
        let mut learned = 0;
        for (row, text) in texts.iter().enumerate() {
            if usable(batch, row) && vectors.is_valid(row) {
                let values = vectors.value(row);
                if let Some(floats) = values.as_any().downcast_ref::<Float32Array>() {
                    let k = embed_key(&fingerprint, text);
                    let answer = Answer::Vector(floats.values().iter().copied().collect());
                    models.cache.know(k, answer);
                    learned += 1;
                }
            }
        }
        Ok(learned)
    }

    /// Starts the counting pass: until [`ModelFunctions::end_count`], the functions call
    /// no model; they answer from the cache, or a stand-in.
    pub fn begin_count(&self) {
        lock(&self.models.would_call).clear();
        self.models.counted_hits.store(0, Ordering::SeqCst);
        self.models.counted_failed.store(0, Ordering::SeqCst);
        self.models.counting.store(true, Ordering::SeqCst);
    }

    /// Whether the counting pass just ended, which called no model, can stand for the
    /// query (no row failed there: failures are reported, and fail the query under
    /// `--fail-on-error`, only when the query runs); its cache hits become the query's.
    pub fn count_answered(&self) -> bool {
        if self.models.counted_failed.load(Ordering::SeqCst) > 0 {
            return false;
        }
        let hits = self.models.counted_hits.swap(0, Ordering::SeqCst);
        lock(&self.models.accounting).cache_hits += hits;
        true
    }

    /// Ends the counting pass: the distinct uncached inputs the query would send to models.
    pub fn end_count(&self) -> usize {
        self.models.counting.store(false, Ordering::SeqCst);
        std::mem::take(&mut *lock(&self.models.would_call)).len()
    }

    /// The most inputs a query may send to models (0: no limit).
    pub fn max_model_rows(&self) -> usize {
        self.models.options.max_model_rows
    }

    /// What the functions did so far.
    pub fn accounting(&self) -> ModelAccounting {
        let mut accounting = lock(&self.models.accounting).clone();
        if let Some(now) = self.models.generator.get().and_then(|g| g.engine_stats()) {
            let base = lock(&self.models.engine_base).unwrap_or_default();
            accounting.engine_prefills = now.prefills - base.prefills;
            accounting.engine_steps = now.steps - base.steps;
        }
        accounting
    }

    /// Writes the answers of this session's model calls to the cache folder.
    pub fn persist(&self) -> Result<usize, crate::PipelineError> {
        self.models.cache.persist()
    }

    /// Notes what the session's queries called and found cached in the cache's log.
    pub fn log_query(&self) {
        let a = self.accounting();
        if a.model_calls + a.cache_hits > 0 {
            self.models.cache.log_query(a.model_calls, a.cache_hits);
        }
    }
}

/// Per input row: the answer, or why there is none (None, None: a NULL input).
struct Results {
    values: Vec<Option<Answer>>,
    errors: Vec<Option<String>>,
}

impl Results {
    fn new(rows: usize) -> Self {
        Self {
            values: vec![None; rows],
            errors: vec![None; rows],
        }
    }
}

impl Models {
    fn embed_config(&self) -> Result<&EmbedConfig, String> {
        self.embed
            .as_ref()
            .ok_or_else(|| "embed(): the job has no [embed] section (pass --job JOB)".into())
    }

    /// The job's `[summarize]` section and its model's fingerprint, for `function`.
    fn generator_model(&self, function: &str) -> Result<(&SummarizeConfig, String)> {
        let config = self
            .summarize_config()
            .map_err(DataFusionError::Execution)?;
        let fingerprint = self
            .generator_identity(config)
            .map_err(|e| exec_datafusion_err!("{function}(): {e}"))?;
        Ok((config, fingerprint))
    }

    /// Requests the generator keeps open (the job's `in_flight`; 8 without `[summarize]`).
    fn in_flight(&self) -> usize {
        self.summarize
            .as_ref()
            .map_or(8, SummarizeConfig::in_flight)
    }

    fn summarize_config(&self) -> Result<&SummarizeConfig, String> {
        self.summarize.as_ref().ok_or_else(|| {
            "summarize(): the job has no [summarize] section (pass --job JOB)".into()
        })
    }

    /// [`SummarizeConfig::model_identity`], once per session: answers are reused only from
    /// the same weights, engine and settings that change numbers.
    fn generator_identity(&self, config: &SummarizeConfig) -> Result<String, OperatorError> {
        self.identity("summarize", || config.model_identity())
    }

    /// [`EmbedConfig::model_identity`], once per session.
    fn encoder_identity(&self, config: &EmbedConfig) -> Result<String, OperatorError> {
        self.identity("embed", || config.model_identity())
    }

    fn identity(
        &self,
        model: &'static str,
        compute: impl FnOnce() -> Result<String, OperatorError>,
    ) -> Result<String, OperatorError> {
        if let Some(known) = lock(&self.identities).get(model) {
            return Ok(known.clone());
        }
        let identity = compute()?;
        lock(&self.identities).insert(model, identity.clone());
        Ok(identity)
    }

    /// Fills `results` from the cache for the rows of `group` (`keys` in the same order);
    /// returns the distinct keys left to compute, each with the first index into `group`
    /// that has it. While counting, those are counted instead, and answered `stand_in`
    /// (so that a call over this one's answers is counted too).
    fn look_up(
        &self,
        group: &[usize],
        keys: &[Key],
        results: &mut Results,
        counting: bool,
        stand_in: &dyn Fn(&Key) -> Answer,
    ) -> Vec<(usize, Key)> {
        let mut todo: Vec<(usize, Key)> = Vec::new();
        let mut seen: HashSet<Key> = HashSet::new();
        let mut hits = 0;
        for (i, (&row, k)) in group.iter().zip(keys).enumerate() {
            match self.cache.get(k) {
                Some(answer) => {
                    results.values[row] = Some(answer);
                    hits += 1;
                }
                None => {
                    if seen.insert(*k) {
                        todo.push((i, *k));
                    }
                }
            }
        }
        if counting {
            for (&row, k) in group.iter().zip(keys) {
                if results.values[row].is_none() {
                    results.values[row] = Some(stand_in(k));
                }
            }
            lock(&self.would_call).extend(todo.iter().map(|&(_, k)| k));
            self.counted_hits.fetch_add(hits, Ordering::SeqCst);
            return Vec::new();
        }
        lock(&self.accounting).cache_hits += hits;
        todo
    }

    /// Puts the models' answers (for `todo`, in its order) into `results` for every row
    /// of `group` that asked the same, and into the cache.
    fn record(
        &self,
        group: &[usize],
        keys: &[Key],
        todo: &[(usize, Key)],
        answers: Vec<std::result::Result<(Key, Answer), String>>,
        results: &mut Results,
    ) {
        let mut by_key: HashMap<Key, std::result::Result<Answer, String>> = HashMap::new();
        let mut accounting = lock(&self.accounting);
        accounting.model_calls += todo.len() as u64;
        for ((_, k), answer) in todo.iter().zip(answers) {
            match answer {
                Ok((_, answer)) => {
                    self.cache.insert(*k, answer.clone());
                    by_key.insert(*k, Ok(answer));
                }
                Err(reason) => {
                    accounting.failed += 1;
                    accounting.first_error.get_or_insert_with(|| reason.clone());
                    by_key.insert(*k, Err(reason));
                }
            }
        }
        for (&row, k) in group.iter().zip(keys) {
            match by_key.get(k) {
                Some(Ok(answer)) => results.values[row] = Some(answer.clone()),
                Some(Err(reason)) => results.errors[row] = Some(reason.clone()),
                None => {}
            }
        }
    }
}

/// The key of `summarize()` of `prompt` (rendered) by the model `identity` with the
/// settings of `version`: a call and a committed run's row (learned) meet on it.
fn summarize_key(identity: &str, version: &str, prompt: &str) -> Key {
    key(&["summarize", identity, version, prompt])
}

/// The key of `embed()` of `text` by the encoder `identity`.
fn embed_key(identity: &str, text: &str) -> Key {
    key(&["embed", identity, text])
}

/// The counting pass's answer to a question not yet asked: distinct per question.
fn stand_in_text(key: &Key) -> String {
    let id: String = key[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("(not yet asked: {id})")
}

/// Whether a committed row went through (its answers are the job's, not a failure's).
fn usable(batch: &RecordBatch, row: usize) -> bool {
    batch
        .column_by_name(abridge_schemas::output::ERROR)
        .is_none_or(|e| e.is_null(row))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn functions(cache: ResultCache) -> ModelFunctions {
        let options = ModelOptions {
            fail_on_error: false,
            max_model_rows: 0,
        };
        ModelFunctions::new(None, None, options, cache)
    }

    fn text(answer: &Option<Answer>) -> &str {
        match answer {
            Some(Answer::Text(t)) => t,
            other => panic!("not a text: {other:?}"),
        }
    }

    /// The guard's counting pass: every row is answered (from the cache, or a stand-in
    /// distinct per question, so that a call over the answers counts too), and the count
    /// is of distinct uncached questions; the cache's hits become the query's when the
    /// counting pass stands for it.
    #[test]
    fn counting_answers_every_row_and_counts_distinct_uncached_questions() {
        let f = functions(ResultCache::new(None, 1 << 20));
        let models = &f.models;
        let keys: Vec<Key> = ["a", "b", "a", "c", "b"]
            .iter()
            .map(|t| embed_key("m", t))
            .collect();
        models.cache.insert(keys[3], Answer::Text("cached".into()));
        let group: Vec<usize> = (0..keys.len()).collect();
        let mut results = Results::new(keys.len());
        f.begin_count();
        let stand_in = |k: &Key| Answer::Text(stand_in_text(k));
        let todo = models.look_up(&group, &keys, &mut results, true, &stand_in);
        assert!(todo.is_empty(), "counting asks nothing");
        assert_eq!(text(&results.values[3]), "cached");
        assert_eq!(text(&results.values[0]), text(&results.values[2]));
        assert_ne!(text(&results.values[0]), text(&results.values[1]));
        assert_eq!(f.end_count(), 2, "a and b; c is cached");
        assert!(f.count_answered());
        assert_eq!(f.accounting().cache_hits, 1);
        assert_eq!(f.accounting().model_calls, 0);
    }

    /// Out of counting: the distinct questions are asked once each, and each answer (or
    /// failure) goes to every row that asked it; answers are cached, failures counted.
    #[test]
    fn answers_reach_every_row_that_asked_and_failures_are_counted_once() {
        let f = functions(ResultCache::new(None, 1 << 20));
        let models = &f.models;
        let keys: Vec<Key> = ["x", "y", "x", "y"]
            .iter()
            .map(|t| summarize_key("m", "v1", t))
            .collect();
        let group = [0, 1, 2, 3];
        let mut results = Results::new(4);
        let stand_in = |k: &Key| Answer::Text(stand_in_text(k));
        let todo = models.look_up(&group, &keys, &mut results, false, &stand_in);
        assert_eq!(todo, vec![(0, keys[0]), (1, keys[1])]);
        let answers = vec![Ok((keys[0], Answer::Text("X".into()))), Err("no".into())];
        models.record(&group, &keys, &todo, answers, &mut results);
        assert_eq!(text(&results.values[2]), "X");
        assert_eq!(results.errors[3].as_deref(), Some("no"));
        assert!(results.values[1].is_none());
        let accounting = f.accounting();
        assert_eq!((accounting.model_calls, accounting.failed), (2, 1));
        assert_eq!(models.cache.get(&keys[0]), Some(Answer::Text("X".into())));
        assert_eq!(
            models.cache.get(&keys[1]),
            None,
            "a failure is not an answer"
        );
    }

    /// Keys tell apart the model, the settings' version and the input, and a learned
    /// answer meets a call on the same key.
    #[test]
    fn keys_separate_model_settings_and_input() {
        let base = summarize_key("m", "v1", "p");
        for other in [
            summarize_key("n", "v1", "p"),
            summarize_key("m", "v2", "p"),
            summarize_key("m", "v1", "q"),
            embed_key("m", "p"),
        ] {
            assert_ne!(base, other);
        }
        assert_eq!(base, summarize_key("m", "v1", "p"));
    }

    /// Rows go to the model in parts of four waves of `in_flight`, covering every row once.
    #[test]
    fn parts_cover_every_row_in_waves_of_in_flight() {
        for (rows, in_flight) in [(0, 8), (1, 8), (32, 8), (33, 8), (100, 1), (5, 0)] {
            let parts: Vec<_> = udf::parts(rows, in_flight).collect();
            let mut next = 0;
            for &(start, len) in &parts {
                assert_eq!(start, next);
                assert!(len >= 1 && len <= (4 * in_flight).max(1), "{parts:?}");
                next += len;
            }
            assert_eq!(next, rows, "{parts:?}");
        }
    }
}
