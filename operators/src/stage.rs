//! The stage contract: what a stage's job-file section says of itself, and how it builds
//! its operators.
//!
//! Vector's `TransformConfig::build` is the model: a section is plain serde data, and one
//! trait turns it into running operators given a [`BuildContext`], which carries what
//! stages share (the encoder, the summarizer's generator, the schema so far) and the
//! counters of what each builds. The job (abridge-pipeline) keeps one ordered table of
//! [`StageSection`]s and derives the rest from it: the executor's chain, the results
//! fingerprint, which keys hold paths, which output columns are reserved. SQL's model
//! functions build their stages through the same trait.
//!
//! A new stage is a module here with its config implementing [`Stage`] and
//! [`StageSection`], and one line in the job's table (`docs/ARCHITECTURE.md`, "How to add
//! a stage").

use std::sync::Arc;

use abridge_models::encoder::EncoderWorker;
use abridge_models::generator::SharedGenerator;
use arrow::datatypes::SchemaRef;
use futures::future::BoxFuture;

use crate::summarize::SummarizeConfig;
use crate::{Operator, OperatorError, StageCounters};

/// What a stage may know of the rest of its job when it checks and builds itself.
#[derive(Debug, Clone, Copy)]
pub struct JobView<'a> {
    /// The sections the job has, by name (`"embed"`, `"filter"`, ...).
    pub sections: &'a [&'static str],
    /// The `[summarize]` section: its model answers every stage that asks one (topics,
    /// summarize, extract).
    pub summarize: Option<&'a SummarizeConfig>,
    /// Summaries drawn per row (`metrics.stability_samples`).
    pub stability_samples: usize,
}

impl JobView<'_> {
    /// Whether the job has the section `name`.
    pub fn has(&self, name: &str) -> bool {
        self.sections.contains(&name)
    }

    /// `Err` naming `key` unless the job has `section`: what a stage says when it needs
    /// another one (`needs`: why, in the user's words).
    pub fn require(&self, section: &str, key: &str, needs: &str) -> Result<(), OperatorError> {
        match self.has(section) {
            true => Ok(()),
            false => Err(OperatorError::config(key, needs)),
        }
    }
}

/// A stage's job-file section: plain data that checks itself against the job and builds
/// the stage's operators. Object-safe, so that a job holds its stages as one list.
pub trait Stage: Send + Sync {
    /// The section's own checks, then what it needs of the job's other sections, each
    /// failure naming its key.
    fn validate(&self, job: &JobView<'_>) -> Result<(), OperatorError>;

    /// What decides its model's answers (files by content, engine, device class), for
    /// keys that reuse them; `None` for a stage without a model of its own. Reads every
    /// byte of the model, once per process.
    fn model_identity(&self) -> Option<Result<String, OperatorError>> {
        None
    }

    /// Adds the stage's operators to `ctx`, reading `ctx.schema()`, before any row flows:
    /// a setting the stage cannot use is an error naming its key. Loads models (minutes
    /// for a large one), so it is asynchronous.
    fn build<'a>(
        &'a self,
        ctx: &'a mut BuildContext<'_>,
    ) -> BoxFuture<'a, Result<(), OperatorError>>;
}

/// What the job knows of a stage before its section is read: the section's name and keys,
/// and the output columns the stage writes.
pub trait StageSection: Stage + serde::Serialize + Sized + 'static {
    /// `[section]` in the job file, and the prefix of its keys.
    const SECTION: &'static str;
    /// Keys of the section holding paths, resolved against the job file's folder.
    const PATH_KEYS: &'static [&'static str] = &[];
    /// Keys that change only how fast it runs, never a row's result: left out of the
    /// results fingerprint.
    const SPEED_KEYS: &'static [&'static str] = &[];
    /// The columns it adds to a row: an input column of one of these names is refused.
    const COLUMNS: &'static [&'static str];
}

/// The chain being built, and what its stages share.
pub struct BuildContext<'a> {
    /// The rest of the job.
    pub job: JobView<'a>,
    schema: SchemaRef,
    operators: Vec<(Box<dyn Operator>, StageCounters)>,
    encoder: Option<EncoderWorker>,
    generator: Option<SharedGenerator>,
    notes: Vec<String>,
    queries: Vec<(String, f32)>,
}

/// What building left: the operators in flow order with their counters, and what the
/// stages shared, for the caller to run and report.
pub struct Built {
    /// The operators, each with the counters it counts into.
    pub operators: Vec<(Box<dyn Operator>, StageCounters)>,
    /// The encoder, if a stage loaded one (the index uses it too).
    pub encoder: Option<EncoderWorker>,
    /// What the user should know (a note per loaded model, the topics of queries).
    pub notes: Vec<String>,
    /// The similarity queries and their thresholds, for the run's summary.
    pub queries: Vec<(String, f32)>,
}

impl<'a> BuildContext<'a> {
    /// An empty chain over batches of `schema`.
    pub fn new(job: JobView<'a>, schema: SchemaRef) -> Self {
        Self {
            job,
            schema,
            operators: Vec::new(),
            encoder: None,
            generator: None,
            notes: Vec::new(),
            queries: Vec::new(),
        }
    }

    /// With the summarizer's generator already loaded (SQL keeps one per session).
    pub fn with_generator(mut self, generator: SharedGenerator) -> Self {
        self.generator = Some(generator);
        self
    }

    /// The schema the next operator reads.
    pub fn schema(&self) -> SchemaRef {
        self.operators
            .last()
            .map_or_else(|| Arc::clone(&self.schema), |(op, _)| op.schema())
    }

    /// Appends `operator`, with counters of its own.
    pub fn push(&mut self, operator: impl Operator + 'static) {
        self.operators
            .push((Box::new(operator), StageCounters::default()));
    }

    /// The encoder that an earlier stage loaded.
    pub fn encoder(&self) -> Result<EncoderWorker, OperatorError> {
        self.encoder.clone().ok_or_else(|| {
            OperatorError::config(
                "embed",
                "the stages that work on vectors need an [embed] section",
            )
        })
    }

    /// Whether an earlier stage loaded an encoder.
    pub fn has_encoder(&self) -> bool {
        self.encoder.is_some()
    }

    /// Shares `encoder` with the stages after this one.
    pub fn set_encoder(&mut self, encoder: EncoderWorker) {
        self.encoder = Some(encoder);
    }

    /// The `[summarize]` model, loaded by the first stage that asks for it and shared by
    /// the rest.
    pub async fn generator(&mut self) -> Result<SharedGenerator, OperatorError> {
        if let Some(generator) = &self.generator {
            return Ok(Arc::clone(generator));
        }
        let config = self.job.summarize.ok_or_else(|| {
            OperatorError::config(
                "summarize",
                "a stage asks the summarizer model, but there is no [summarize] section",
            )
        })?;
        let (generator, note) = config.load_generator().await?;
        self.notes.push(note);
        self.generator = Some(Arc::clone(&generator));
        Ok(generator)
    }

    /// Something the user should know of how the stage was built.
    pub fn note(&mut self, note: String) {
        self.notes.push(note);
    }

    /// The similarity queries and their thresholds, as the filter resolved them.
    pub fn queries(&self) -> &[(String, f32)] {
        &self.queries
    }

    /// Records the filter's queries for the stages after it and the run's summary.
    pub fn set_queries(&mut self, queries: Vec<(String, f32)>) {
        self.queries = queries;
    }

    /// The chain, and what its stages shared.
    pub fn finish(self) -> Built {
        Built {
            operators: self.operators,
            encoder: self.encoder,
            notes: self.notes,
            queries: self.queries,
        }
    }
}
