//! `summarize(text [, prompt])`: the summarize stage a run of the job builds, over the
//! call's rows, one stage per prompt.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use abridge_models::generator::SharedGenerator;
use abridge_operators::stage::{BuildContext, JobView, Stage, StageSection};
use abridge_operators::summarize::{
    COMPLETION_TOKENS, PROMPT_TOKENS, SUMMARY, SummarizeConfig, SummarizeSettings,
};
use abridge_operators::template::Template;
use abridge_operators::{Operator, OperatorError, StageCounters};
use arrow::array::{
    Array, ArrayRef, AsArray, Int32Array, RecordBatch, StringArray, new_null_array,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::exec_datafusion_err;
use datafusion::error::{DataFusionError, Result};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use futures::TryStreamExt;
use tokio::sync::OnceCell;

use super::{Models, Results, lock, stand_in_text, summarize_key};
use crate::sql::result_cache::{Answer, Key};

/// The job's summarize settings with one prompt, and its stage once the model is loaded.
pub(super) struct Summarizer {
    /// The job's `[summarize]` with the call's prompt.
    config: SummarizeConfig,
    pub(super) settings: SummarizeSettings,
    pub(super) version: String,
    template: Template,
    /// Built through the stage contract, as a run builds it.
    stage: OnceCell<Box<dyn Operator>>,
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

impl Models {
    pub(super) fn summarizer(
        &self,
        prompt: Option<&str>,
    ) -> Result<Arc<Summarizer>, OperatorError> {
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
            config,
            template,
            stage: OnceCell::new(),
        });
        lock(&self.summarizers).insert(prompt, Arc::clone(&summarizer));
        Ok(summarizer)
    }

    pub(super) async fn generator(&self) -> Result<SharedGenerator> {
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

    pub(super) async fn summarize(
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
                .map(|p| summarize_key(&fingerprint, &summarizer.version, p))
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
                .get_or_try_init(|| summarize_stage(&summarizer.config, generator))
                .await
                .map_err(|e| exec_datafusion_err!("summarize(): {e}"))?;
            let picked: Vec<usize> = todo.iter().map(|&(i, _)| group[i]).collect();
            let started = Instant::now();
            let out = run_once(stage.as_ref(), input_batch(texts, &picked)?)
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
}

/// The summarize stage of `config` over a call's rows ([`input_schema`]), built through the
/// stage contract with the session's `generator`: what a run of the job would build.
async fn summarize_stage(
    config: &SummarizeConfig,
    generator: SharedGenerator,
) -> std::result::Result<Box<dyn Operator>, OperatorError> {
    let sections = [SummarizeConfig::SECTION];
    let job = JobView {
        sections: &sections,
        summarize: Some(config),
        stability_samples: 1,
    };
    let mut context = BuildContext::new(job, input_schema()).with_generator(generator);
    Stage::build(config, &mut context).await?;
    let mut built = context.finish().operators;
    match (built.pop(), built.is_empty()) {
        (Some((stage, _)), true) => Ok(stage),
        _ => Err(OperatorError::StageSchema(
            "summarize built other than one operator".into(),
        )),
    }
}

/// `batch` through `stage`, as one batch of a stream.
async fn run_once(
    stage: &dyn Operator,
    batch: RecordBatch,
) -> std::result::Result<RecordBatch, OperatorError> {
    let schema = batch.schema();
    let input = futures::stream::once(async move { Ok(batch) });
    let input = Box::pin(RecordBatchStreamAdapter::new(schema, input));
    let output = stage.execute(input, StageCounters::default())?;
    let batches: Vec<RecordBatch> = output.try_collect().await?;
    Ok(arrow::compute::concat_batches(&stage.schema(), &batches)?)
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
