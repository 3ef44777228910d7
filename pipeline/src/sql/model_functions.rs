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

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use abridge_models::encoder::EncoderWorker;
use abridge_models::generator::{EngineStats, SharedGenerator};
use abridge_operators::embed::{EmbedConfig, embedding_field};
use abridge_operators::summarize::{
    COMPLETION_TOKENS, PROMPT_TOKENS, SUMMARY, Summarize, SummarizeConfig, SummarizeSettings,
};
use abridge_operators::tasks::{self, check_field_names};
use abridge_operators::template::Template;
use abridge_operators::{AsyncBatchTransform, AsyncTransformStage, OperatorError, StageCounters};
use arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, Int32Array, ListArray, RecordBatch,
    StringArray, StructArray, new_null_array,
};
use arrow::buffer::NullBuffer;
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, FieldRef, Fields, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::common::{ScalarValue, exec_datafusion_err, exec_err, plan_err};
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::async_udf::{AsyncScalarUDF, AsyncScalarUDFImpl};
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    TypeSignature, Volatility,
};
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

/// The job's summarize settings with one prompt, and its stage once the model is loaded.
struct Summarizer {
    settings: SummarizeSettings,
    version: String,
    template: Template,
    stage: OnceCell<AsyncTransformStage<Summarize>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The columns a `summarize()` call gives the summarize stage: the text, no title, and an
/// id that is the text's digest (so sampling draws depend on the text only).
fn input_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, true),
        Field::new("title", DataType::Utf8, true),
        Field::new("text", DataType::Utf8, true),
        Field::new(abridge_schemas::output::ERROR, DataType::Utf8, true),
    ]))
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
                let k = key(&["summarize", &fingerprint, &summarizer.version, prompt]);
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
                    let k = key(&["embed", &fingerprint, text]);
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Summarize,
    Embed,
    Classify,
    Extract,
}

struct ModelFunction {
    kind: Kind,
    /// The `try_` form: `{result, error}`.
    detailed: bool,
    signature: Signature,
    models: Arc<Models>,
}

impl fmt::Debug for ModelFunction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelFunction")
            .field("name", &self.name())
            .finish_non_exhaustive()
    }
}

impl PartialEq for ModelFunction {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind
            && self.detailed == other.detailed
            && Arc::ptr_eq(&self.models, &other.models)
    }
}

impl Eq for ModelFunction {}

impl Hash for ModelFunction {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.kind.hash(state);
        self.detailed.hash(state);
        (Arc::as_ptr(&self.models) as usize).hash(state);
    }
}

impl ScalarUDFImpl for ModelFunction {
    fn name(&self) -> &str {
        match (self.kind, self.detailed) {
            (Kind::Summarize, false) => "summarize",
            (Kind::Summarize, true) => "try_summarize",
            (Kind::Embed, false) => "embed",
            (Kind::Embed, true) => "try_embed",
            (Kind::Classify, false) => "classify",
            (Kind::Classify, true) => "try_classify",
            // Not `extract`: SQL's EXTRACT(field FROM date) owns that name.
            (Kind::Extract, false) => "extract_fields",
            (Kind::Extract, true) => "try_extract_fields",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        let value = match self.kind {
            Kind::Summarize | Kind::Classify => DataType::Utf8,
            Kind::Embed => {
                let config = self.models.embed_config().map_err(DataFusionError::Plan)?;
                embedding_field(embedding_dim(&config.model)?)
                    .data_type()
                    .clone()
            }
            // Its fields are the values of its second argument.
            Kind::Extract => return plan_err!("extract_fields() needs its arguments to plan"),
        };
        Ok(match self.detailed {
            false => value,
            true => DataType::Struct(detailed_fields(value)),
        })
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef> {
        if self.kind != Kind::Extract {
            let types: Vec<DataType> = args
                .arg_fields
                .iter()
                .map(|f| f.data_type().clone())
                .collect();
            return Ok(Arc::new(Field::new(
                self.name(),
                self.return_type(&types)?,
                true,
            )));
        }
        // A text literal: the names must be known when the query is planned, before any
        // expression is folded (a list literal is still a function call then).
        let names: Vec<String> = match args.scalar_arguments.get(1) {
            Some(Some(ScalarValue::Utf8(Some(list)) | ScalarValue::LargeUtf8(Some(list))))
            | Some(Some(ScalarValue::Utf8View(Some(list)))) => {
                list.split(',').map(|n| n.trim().to_string()).collect()
            }
            _ => {
                return plan_err!(
                    "{}(text, fields): fields must be a text written in the query, the names \
                     separated by commas, e.g. 'device, location'",
                    self.name()
                );
            }
        };
        if let Err(problem) = check_field_names(&names) {
            return plan_err!("{}(): fields: the list {problem}", self.name());
        }
        let value = DataType::Struct(
            names
                .iter()
                .map(|n| Field::new(n, DataType::Utf8, true))
                .collect(),
        );
        let value = match self.detailed {
            false => value,
            true => DataType::Struct(detailed_fields(value)),
        };
        Ok(Arc::new(Field::new(self.name(), value, true)))
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        exec_err!("{}() runs only as an async function", self.name())
    }
}

fn detailed_fields(value: DataType) -> Fields {
    Fields::from(vec![
        Field::new("result", value, true),
        Field::new("error", DataType::Utf8, true),
    ])
}

/// The vector length of the encoder in `dir`: its config.json's `hidden_size` (what
/// abridge's BERT encoder returns), read without loading the model.
fn embedding_dim(dir: &Path) -> Result<usize> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| exec_datafusion_err!("embed(): {}: {e}", path.display()))?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| exec_datafusion_err!("embed(): {}: {e}", path.display()))?;
    config
        .get("hidden_size")
        .and_then(serde_json::Value::as_i64)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| exec_datafusion_err!("embed(): {}: no hidden_size", path.display()))
}

/// What [`Models::ask_each`] asks about: the question, the inputs, the rows of them
/// asked, and each row's key.
struct Asking<'a> {
    question: Question,
    texts: &'a StringArray,
    group: &'a [usize],
    keys: &'a [Key],
}

/// A task of [`abridge_operators::tasks`], with what it asks for.
enum Question {
    Classify(Arc<[String]>),
    Extract(Arc<[String]>),
}

impl Question {
    /// The SQL function that asks it, for error messages.
    fn function(&self) -> &'static str {
        match self {
            Question::Classify(_) => "classify",
            Question::Extract(_) => "extract_fields",
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

#[async_trait]
impl AsyncScalarUDFImpl for ModelFunction {
    async fn invoke_async_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let rows = args.number_rows;
        // A literal argument is one value: as many rows of it as the batch has.
        let arrays = args
            .args
            .iter()
            .map(|a| a.to_array(rows))
            .collect::<Result<Vec<_>>>()?;
        let texts = cast(&arrays[0], &DataType::Utf8)?;
        let texts = texts.as_string::<i32>();
        let value_type = match args.return_field.data_type() {
            DataType::Struct(fields) if self.detailed => fields[0].data_type().clone(),
            other => other.clone(),
        };
        let counting = self.models.counting.load(Ordering::SeqCst);
        let prompts = match (self.kind, arrays.get(1)) {
            (Kind::Summarize, Some(p)) => Some(cast(p, &DataType::Utf8)?),
            _ => None,
        };
        let labels = match self.kind {
            Kind::Classify => Some(arrays[1].as_list_opt::<i32>().cloned().ok_or_else(|| {
                exec_datafusion_err!(
                    "classify(text, labels): labels must be a list of texts, e.g. \
                     ['billing', 'printing']"
                )
            })?),
            _ => None,
        };
        let names: Vec<String> = match (self.kind, &value_type) {
            (Kind::Extract, DataType::Struct(fields)) => {
                fields.iter().map(|f| f.name().clone()).collect()
            }
            (Kind::Extract, _) => return exec_err!("extract_fields(): its result is not a struct"),
            _ => Vec::new(),
        };
        // Rows go to the model a few waves at a time, and each part's answers are kept
        // before the next is asked: a query stopped halfway keeps what it paid for.
        let part = (4 * self.models.in_flight()).max(1);
        let mut results = Results::new(0);
        for start in (0..rows).step_by(part) {
            let len = part.min(rows - start);
            let texts = texts.slice(start, len);
            let answered = match self.kind {
                Kind::Summarize => {
                    let prompts = prompts
                        .as_ref()
                        .map(|p| p.as_string::<i32>().slice(start, len));
                    self.models
                        .summarize(&texts, prompts.as_ref(), counting)
                        .await?
                }
                Kind::Embed => self.models.embed(&texts, counting).await?,
                Kind::Classify => {
                    let labels = labels.as_ref().map(|l| l.slice(start, len));
                    let labels =
                        labels.ok_or_else(|| exec_datafusion_err!("classify(): no labels"))?;
                    self.models.classify(&texts, &labels, counting).await?
                }
                Kind::Extract => self.models.extract(&texts, &names, counting).await?,
            };
            results.values.extend(answered.values);
            results.errors.extend(answered.errors);
            if !counting && let Err(e) = self.models.cache.persist() {
                // A cache that cannot be written only costs those answers.
                tracing::warn!("model result cache: {e} (these answers are not kept)");
            }
        }
        let failed = results.errors.iter().flatten().count();
        if counting {
            let failed = failed as u64;
            self.models
                .counted_failed
                .fetch_add(failed, Ordering::SeqCst);
        }
        if failed > 0 && self.models.options.fail_on_error && !counting {
            let first = results
                .errors
                .iter()
                .flatten()
                .next()
                .cloned()
                .unwrap_or_default();
            return exec_err!(
                "{}(): {failed} of {rows} rows failed (--fail-on-error), the first: {first}",
                self.name()
            );
        }
        let values = build_values(&results.values, &value_type)?;
        if !self.detailed {
            return Ok(ColumnarValue::Array(values));
        }
        let errors: ArrayRef = Arc::new(StringArray::from(results.errors));
        let fields = detailed_fields(value_type);
        let result = StructArray::try_new(fields, vec![values, errors], None)?;
        Ok(ColumnarValue::Array(Arc::new(result)))
    }
}

/// The answers as an array of `value_type` (text, or the embedding's fixed-size list).
fn build_values(values: &[Option<Answer>], value_type: &DataType) -> Result<ArrayRef> {
    match value_type {
        DataType::Utf8 => Ok(Arc::new(StringArray::from_iter(values.iter().map(
            |v| match v {
                Some(Answer::Text(t)) => Some(t.as_str()),
                _ => None,
            },
        )))),
        DataType::FixedSizeList(item, dim) => {
            let dim = *dim as usize;
            let mut floats = Vec::with_capacity(values.len() * dim);
            let mut valid = Vec::with_capacity(values.len());
            for value in values {
                match value {
                    Some(Answer::Vector(v)) if v.len() == dim => {
                        floats.extend_from_slice(v);
                        valid.push(true);
                    }
                    _ => {
                        floats.extend(std::iter::repeat_n(0.0, dim));
                        valid.push(false);
                    }
                }
            }
            let array = FixedSizeListArray::try_new(
                Arc::clone(item),
                dim as i32,
                Arc::new(Float32Array::from(floats)),
                Some(NullBuffer::from(valid)),
            )?;
            Ok(Arc::new(array))
        }
        DataType::Struct(fields) => {
            // Answers here parsed once already (rows that did not are errors, and None).
            let names: Vec<String> = fields.iter().map(|f| f.name().clone()).collect();
            let parsed: Vec<Option<Vec<Option<String>>>> = values
                .iter()
                .map(|v| match v {
                    Some(Answer::Text(raw)) => tasks::parse_fields(raw, &names).ok(),
                    _ => None,
                })
                .collect();
            Ok(Arc::new(tasks::fields_array(fields, &parsed)?))
        }
        other => Ok(new_null_array(other, values.len())),
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

    fn summarizer(&self, prompt: Option<&str>) -> Result<Arc<Summarizer>, OperatorError> {
        let prompt = prompt.map(str::to_string);
        if let Some(known) = lock(&self.summarizers).get(&prompt) {
            return Ok(Arc::clone(known));
        }
        let config = self
            .summarize_config()
            .map_err(|message| OperatorError::config("summarize", message))?;
        let mut config = config.clone();
        if let Some(prompt) = &prompt {
            config.prompt = prompt.clone();
        }
        let settings = config.settings(1)?;
        let template = Template::parse(&settings.template, &input_schema()).map_err(|e| {
            OperatorError::config(
                "summarize.prompt",
                format!(
                    "{e}: a summarize() call has only {{text}} (and an empty {{title}}); \
                     pass a prompt as its second argument"
                ),
            )
        })?;
        if !settings.template.contains("{text}") {
            return Err(OperatorError::config(
                "summarize.prompt",
                format!(
                    "{:?} neither names a preset nor uses {{text}}",
                    settings.template
                ),
            ));
        }
        let summarizer = Arc::new(Summarizer {
            version: settings.version(),
            settings,
            template,
            stage: OnceCell::new(),
        });
        lock(&self.summarizers).insert(prompt, Arc::clone(&summarizer));
        Ok(summarizer)
    }

    async fn generator(&self) -> Result<SharedGenerator> {
        let config = self
            .summarize_config()
            .map_err(DataFusionError::Execution)?;
        let generator = self
            .generator
            .get_or_try_init(|| async {
                let (generator, _) = config.load_generator().await?;
                *lock(&self.engine_base) = generator.engine_stats();
                Ok::<_, OperatorError>(generator)
            })
            .await
            .map_err(|e| exec_datafusion_err!("summarize(): {e}"))?;
        Ok(Arc::clone(generator))
    }

    async fn summarize(
        &self,
        texts: &StringArray,
        prompts: Option<&StringArray>,
        counting: bool,
    ) -> Result<Results> {
        let rows = texts.len();
        let mut results = Results::new(rows);
        // Rows by prompt: each prompt has its own settings and version.
        let mut groups: HashMap<Option<&str>, Vec<usize>> = HashMap::new();
        for row in (0..rows).filter(|&r| texts.is_valid(r)) {
            let prompt = prompts.filter(|p| p.is_valid(row)).map(|p| p.value(row));
            groups.entry(prompt).or_default().push(row);
        }
        let (_, fingerprint) = self.generator_model("summarize")?;
        for (prompt, group) in groups {
            let summarizer = match self.summarizer(prompt) {
                Ok(s) => s,
                Err(e) => {
                    let reason = format!("summarize: {e}");
                    if !counting {
                        let mut accounting = lock(&self.accounting);
                        accounting.failed += group.len() as u64;
                        accounting.first_error.get_or_insert_with(|| reason.clone());
                    }
                    for &row in &group {
                        results.errors[row] = Some(reason.clone());
                    }
                    continue;
                }
            };
            let batch = input_batch(texts, &group)?;
            let rendered = summarizer
                .template
                .render(&batch, &vec![true; group.len()])
                .map_err(|e| exec_datafusion_err!("summarize(): {e}"))?;
            let keys: Vec<Key> = rendered
                .iter()
                .map(|p| key(&["summarize", &fingerprint, &summarizer.version, p]))
                .collect();
            let todo = self.look_up(&group, &keys, &mut results, counting, &|k| {
                Answer::Text(stand_in_text(k))
            });
            if todo.is_empty() {
                continue;
            }
            let generator = self.generator().await?;
            let stage = summarizer
                .stage
                .get_or_try_init(|| async {
                    Summarize::try_new(generator, summarizer.settings.clone(), &input_schema())
                })
                .await
                .map_err(|e| exec_datafusion_err!("summarize(): {e}"))?;
            let picked: Vec<usize> = todo.iter().map(|&(i, _)| group[i]).collect();
            let started = Instant::now();
            let out = stage
                .inner()
                .transform(input_batch(texts, &picked)?, &StageCounters::default())
                .await
                .map_err(|e| exec_datafusion_err!("summarize(): {e}"))?;
            let elapsed = started.elapsed();
            let column = |name: &str| {
                out.column_by_name(name)
                    .cloned()
                    .ok_or_else(|| exec_datafusion_err!("summarize(): no `{name}` column"))
            };
            let summaries = column(SUMMARY)?;
            let summaries = summaries.as_string::<i32>();
            let errors = column(abridge_schemas::output::ERROR)?;
            let errors = errors.as_string::<i32>();
            let tokens = |name: &str| -> Result<u64> {
                let c = column(name)?;
                let c = c
                    .as_any()
                    .downcast_ref::<Int32Array>()
                    .ok_or_else(|| exec_datafusion_err!("summarize(): `{name}` is not int32"))?;
                Ok(c.iter().flatten().map(|n| n.max(0) as u64).sum())
            };
            let (prompt_tokens, completion_tokens) =
                (tokens(PROMPT_TOKENS)?, tokens(COMPLETION_TOKENS)?);
            let mut answers = Vec::with_capacity(todo.len());
            for (at, (_, k)) in todo.iter().enumerate() {
                answers.push(match summaries.is_valid(at) {
                    true => Ok((*k, Answer::Text(summaries.value(at).to_string()))),
                    false => Err(match errors.is_valid(at) {
                        true => errors.value(at).to_string(),
                        false => "summarize: no summary".to_string(),
                    }),
                });
            }
            self.record(&group, &keys, &todo, answers, &mut results);
            let mut accounting = lock(&self.accounting);
            accounting.prompt_tokens += prompt_tokens;
            accounting.completion_tokens += completion_tokens;
            accounting.model_ms += elapsed.as_millis() as u64;
        }
        Ok(results)
    }

    async fn embed(&self, texts: &StringArray, counting: bool) -> Result<Results> {
        let rows = texts.len();
        let mut results = Results::new(rows);
        let config = self.embed_config().map_err(DataFusionError::Execution)?;
        let fingerprint = self
            .encoder_identity(config)
            .map_err(|e| exec_datafusion_err!("embed(): {e}"))?;
        let group: Vec<usize> = (0..rows).filter(|&r| texts.is_valid(r)).collect();
        let keys: Vec<Key> = group
            .iter()
            .map(|&r| key(&["embed", &fingerprint, texts.value(r)]))
            .collect();
        // The stand-in's length is read from the model's config only while counting: not
        // on every part of a query that calls the encoder.
        let dim = match counting {
            true => embedding_dim(&config.model)?,
            false => 0,
        };
        let zeros = |_: &Key| Answer::Vector(vec![0.0; dim].into());
        let todo = self.look_up(&group, &keys, &mut results, counting, &zeros);
        if todo.is_empty() {
            return Ok(results);
        }
        let encoder = self
            .encoder
            .get_or_try_init(|| config.load_encoder())
            .await
            .map_err(|e| exec_datafusion_err!("embed(): {e}"))?;
        let inputs: Vec<String> = todo
            .iter()
            .map(|&(i, _)| texts.value(group[i]).to_string())
            .collect();
        let started = Instant::now();
        let encoded = encoder.encode(inputs).await;
        let elapsed = started.elapsed();
        let dim = encoder.dim();
        let answers: Vec<_> = match encoded {
            Ok(vectors) => todo
                .iter()
                .zip(vectors.chunks(dim))
                .map(|(&(_, k), v)| Ok((k, Answer::Vector(v.into()))))
                .collect(),
            Err(e) => todo.iter().map(|_| Err(format!("embed: {e}"))).collect(),
        };
        self.record(&group, &keys, &todo, answers, &mut results);
        lock(&self.accounting).model_ms += elapsed.as_millis() as u64;
        Ok(results)
    }

    async fn classify(
        &self,
        texts: &StringArray,
        labels: &ListArray,
        counting: bool,
    ) -> Result<Results> {
        let rows = texts.len();
        let mut results = Results::new(rows);
        let (config, fingerprint) = self.generator_model("classify")?;
        // Rows by label set.
        let mut groups: HashMap<Vec<String>, Vec<usize>> = HashMap::new();
        for row in (0..rows).filter(|&r| texts.is_valid(r) && labels.is_valid(r)) {
            let values = cast(&labels.value(row), &DataType::Utf8)?;
            let set: Vec<String> = values
                .as_string::<i32>()
                .iter()
                .flatten()
                .map(str::to_string)
                .collect();
            groups.entry(set).or_default().push(row);
        }
        let seqgpt = config.task_settings().seqgpt;
        for (set, group) in groups {
            if set.is_empty() {
                for &row in &group {
                    results.errors[row] = Some("classify: no labels".into());
                }
                continue;
            }
            // Keyed by the very question asked, so that a changed prompt asks again.
            let max_input = format!("max_input={}", config.max_input_tokens);
            let keys: Vec<Key> = group
                .iter()
                .map(|&r| {
                    let question = tasks::classification_prompt(texts.value(r), &set, seqgpt);
                    key(&["classify", &fingerprint, &max_input, &question])
                })
                .collect();
            let todo = self.look_up(&group, &keys, &mut results, counting, &|k| {
                Answer::Text(stand_in_text(k))
            });
            if todo.is_empty() {
                continue;
            }
            let asked = Asking {
                question: Question::Classify(set.into()),
                texts,
                group: &group,
                keys: &keys,
            };
            self.ask_each(config, asked, &todo, &mut results).await?;
        }
        Ok(results)
    }

    async fn extract(
        &self,
        texts: &StringArray,
        names: &[String],
        counting: bool,
    ) -> Result<Results> {
        let rows = texts.len();
        let mut results = Results::new(rows);
        let (config, fingerprint) = self.generator_model("extract_fields")?;
        let seqgpt = config.task_settings().seqgpt;
        // "form": answers are filled-in forms where the engine can constrain decoding. Keyed
        // by the very question asked, so that a changed prompt asks again.
        let style = format!(
            "form max_input={} max_new={}",
            config.max_input_tokens, config.max_new_tokens
        );
        let group: Vec<usize> = (0..rows).filter(|&r| texts.is_valid(r)).collect();
        let keys: Vec<Key> = group
            .iter()
            .map(|&r| {
                let question = tasks::extraction_prompt(texts.value(r), names, seqgpt);
                key(&["extract", &fingerprint, &style, &question])
            })
            .collect();
        // A form whose every value is distinct, so that calls over a field are counted.
        let form = |k: &Key| {
            let value = stand_in_text(k);
            let lines: Vec<String> = names.iter().map(|n| format!("{n}: {value}")).collect();
            Answer::Text(lines.join("\n"))
        };
        let todo = self.look_up(&group, &keys, &mut results, counting, &form);
        if !todo.is_empty() {
            let asked = Asking {
                question: Question::Extract(names.into()),
                texts,
                group: &group,
                keys: &keys,
            };
            self.ask_each(config, asked, &todo, &mut results).await?;
        }
        // Answers, new or cached, are parsed strictly: one that does not parse is the row's
        // error (the raw answer stays cached; parsing it again gives the same error).
        let mut failed = Vec::new();
        for row in 0..rows {
            if let Some(Answer::Text(raw)) = &results.values[row]
                && let Err(reason) = tasks::parse_fields(raw, names)
            {
                failed.push(format!("extract_fields: {reason} (answer: {raw:?})"));
                results.errors[row] = failed.last().cloned();
                results.values[row] = None;
            }
        }
        if !counting && !failed.is_empty() {
            let mut accounting = lock(&self.accounting);
            accounting.failed += failed.len() as u64;
            accounting
                .first_error
                .get_or_insert_with(|| failed[0].clone());
        }
        Ok(results)
    }

    /// Asks the generator `asked.question` about each input of `todo` (indices into
    /// `asked.group`), as a run's stages do ([`abridge_operators::tasks`]); the answers are
    /// recorded as [`Models::record`] does, their tokens and time in the accounting.
    async fn ask_each(
        &self,
        config: &SummarizeConfig,
        asked: Asking<'_>,
        todo: &[(usize, Key)],
        results: &mut Results,
    ) -> Result<()> {
        let generator = self.generator().await?;
        let settings = config.task_settings();
        let texts: Vec<String> = todo
            .iter()
            .map(|&(i, _)| asked.texts.value(asked.group[i]).to_string())
            .collect();
        let function = asked.question.function();
        let started = Instant::now();
        let answers = match asked.question {
            Question::Classify(labels) => {
                tasks::classify_each(&generator, texts, labels, &settings).await
            }
            Question::Extract(names) => {
                tasks::extract_each(&generator, texts, names, &settings).await
            }
        };
        let elapsed = started.elapsed();
        let mut tokens = (0, 0);
        let answers = todo
            .iter()
            .zip(answers)
            .map(|(&(_, k), a)| match a {
                Ok(g) => {
                    tokens.0 += g.prompt_tokens as u64;
                    tokens.1 += g.completion_tokens as u64;
                    Ok((k, Answer::Text(g.text)))
                }
                Err(e) => Err(format!("{function}: {e}")),
            })
            .collect();
        self.record(asked.group, asked.keys, todo, answers, results);
        let mut accounting = lock(&self.accounting);
        accounting.prompt_tokens += tokens.0;
        accounting.completion_tokens += tokens.1;
        accounting.model_ms += elapsed.as_millis() as u64;
        Ok(())
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

/// The summarize stage's input for `rows` of `texts`.
fn input_batch(texts: &StringArray, rows: &[usize]) -> Result<RecordBatch> {
    let text: StringArray = rows.iter().map(|&r| Some(texts.value(r))).collect();
    let ids: StringArray = rows
        .iter()
        .map(|&r| Some(blake3::hash(texts.value(r).as_bytes()).to_hex()[..32].to_string()))
        .collect();
    let n = rows.len();
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ids),
        new_null_array(&DataType::Utf8, n),
        Arc::new(text),
        new_null_array(&DataType::Utf8, n),
    ];
    Ok(RecordBatch::try_new(input_schema(), columns)?)
}
