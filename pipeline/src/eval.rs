//! `abridge eval`: measure historical runs again (a new reference, a changed definition,
//! runs older than a metric), and put two runs side by side on the tickets they share.
//!
//! The runs are read, never written: each evaluation is a new table of its own,
//! `RUNS/_eval/<eval_id>/evaluation.parquet`, with a `summary.json` beside it. The
//! `_` prefix keeps it out of the output table for every Parquet reader.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use abridge_operators::quality::{
    ALERTS, AlertThresholds, COMPRESSION, DRIFT, ROUGE_L, ROUGE1, ROUGE2, STABILITY,
};
use arrow::array::{
    Array, ArrayRef, AsArray, Float64Array, ListBuilder, RecordBatch, StringBuilder,
};
use arrow::datatypes::{DataType, Field, Float64Type, Schema, SchemaRef};
use serde::Serialize;

use abridge_models::encoder::EncoderWorker;
use abridge_models::models::bert::BertEncoder;

use crate::error::PipelineError;
use crate::sql::SqlSession;
use crate::table::manifest::{self as run, committed_runs};

/// What to evaluate and how.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// The output table whose runs are evaluated.
    pub runs: PathBuf,
    /// Run ids to evaluate; empty: every committed run.
    pub run_ids: Vec<String>,
    /// The column holding the text to measure. Default `summary`.
    pub summary: String,
    /// The reference column: in the runs, or in `reference_table`. Default `reference`.
    pub reference: String,
    /// A Parquet file, folder or glob with `id` and the reference column, joined on `id`.
    pub reference_table: Option<String>,
    /// Porter-stem words before ROUGE.
    pub stem: bool,
    /// The measures computed again; the others are read from the runs (null where a run
    /// lacks them).
    pub recompute: Vec<Recompute>,
    /// An encoder folder to embed text and summary again for `drift` (the current model,
    /// when the runs' vectors came from another); without it, drift uses the stored vectors.
    pub encoder: Option<PathBuf>,
    /// Thresholds of the `alerts` column set here; the rest are each run's own
    /// (`[metrics.alerts]` of its recorded job).
    pub thresholds: AlertOverrides,
    /// Where the evaluation goes; default `RUNS/_eval/<eval_id>`.
    pub out: Option<PathBuf>,
}

/// Alert thresholds given on the command line, each replacing the runs' own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct AlertOverrides {
    /// Replaces `drift_min`.
    pub drift_min: Option<f64>,
    /// Replaces `compression_min`.
    pub compression_min: Option<f64>,
    /// Replaces `compression_max`.
    pub compression_max: Option<f64>,
    /// Replaces `stability_max`.
    pub stability_max: Option<f64>,
}

impl AlertOverrides {
    /// `recorded` with the overridden thresholds replaced.
    pub fn apply(&self, recorded: AlertThresholds) -> AlertThresholds {
        AlertThresholds {
            drift_min: self.drift_min.unwrap_or(recorded.drift_min),
            compression_min: self.compression_min.unwrap_or(recorded.compression_min),
            compression_max: self.compression_max.unwrap_or(recorded.compression_max),
            stability_max: self.stability_max.unwrap_or(recorded.stability_max),
        }
    }
}

/// The alert thresholds a run was made with: `[metrics.alerts]` of its recorded job
/// (defaults for the keys it leaves out, and for runs without a record).
fn recorded_thresholds(run_dir: &Path) -> Result<AlertThresholds, PipelineError> {
    let path = run_dir.join(run::JOB_RECORD);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(AlertThresholds::default());
        }
        Err(source) => return Err(PipelineError::Io { path, source }),
    };
    let unreadable = |e: String| PipelineError::Usage(format!("{}: {e}", path.display()));
    let job: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| unreadable(e.to_string()))?;
    match job.get("metrics").and_then(|m| m.get("alerts")) {
        Some(alerts) => alerts
            .clone()
            .try_into()
            .map_err(|e: toml::de::Error| unreadable(format!("[metrics.alerts]: {e}"))),
        None => Ok(AlertThresholds::default()),
    }
}

/// A measure `eval` can compute again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Recompute {
    /// ROUGE-1, ROUGE-2, ROUGE-L against the reference.
    Rouge,
    /// Cosine of the text's and the summary's vectors.
    Drift,
    /// Characters of summary per character of text.
    Compression,
}

/// Means and counts of one run's evaluation.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RunSummary {
    /// The run.
    pub run_id: String,
    /// Rows with a summary (the ones measured).
    pub summarized: u64,
    /// Rows without one (failed, filtered out, or not summarized): skipped.
    pub without_summary: u64,
    /// Of those, rows without ROUGE: no reference (or ROUGE neither recomputed nor stored).
    pub without_reference: u64,
    /// Mean of each measure over the rows that have it.
    pub means: BTreeMap<String, Option<f64>>,
    /// Rows raising each alert.
    pub alerts: BTreeMap<String, u64>,
    /// The thresholds its alerts were raised with: the run's own, less any overridden.
    pub thresholds: AlertThresholds,
}

/// What an evaluation wrote and found.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    /// The evaluation's folder.
    pub dir: PathBuf,
    /// Per run, in run order.
    pub runs: Vec<RunSummary>,
    /// The evaluated rows (also in `dir/evaluation.parquet`).
    #[serde(skip)]
    pub batches: Vec<RecordBatch>,
}

/// The measures `eval` writes, in column order.
const MEASURES: [&str; 6] = [ROUGE1, ROUGE2, ROUGE_L, DRIFT, COMPRESSION, STABILITY];

/// Evaluates the runs `options` names and writes the evaluation table and its summary.
pub async fn evaluate(options: &EvalOptions) -> Result<Evaluation, PipelineError> {
    let selected = selected_runs(&options.runs, &options.run_ids)?;
    let mut thresholds = BTreeMap::new();
    for (dir, manifest) in &selected {
        let recorded = recorded_thresholds(dir)?;
        thresholds.insert(manifest.run_id.clone(), options.thresholds.apply(recorded));
    }
    let dirs: Vec<PathBuf> = selected.into_iter().map(|(dir, _)| dir).collect();
    let mut session = SqlSession::new();
    session.register_run_dirs("runs", &dirs).await?;
    let columns = session.columns("runs").await?;
    let has = |name: &str| columns.iter().any(|c| c == name);
    if !has(&options.summary) {
        return Err(PipelineError::Usage(format!(
            "{}: the runs have no `{}` column (runs made without [summarize] have no \
             summaries; --summary names another column)",
            options.runs.display(),
            options.summary
        )));
    }
    let summary = format!("CAST(runs.\"{}\" AS VARCHAR)", options.summary);
    let again = |m: Recompute| options.recompute.contains(&m);
    let stored = |name: &str| {
        if has(name) {
            format!("CAST(runs.\"{name}\" AS DOUBLE)")
        } else {
            "CAST(NULL AS DOUBLE)".to_string()
        }
    };
    let reference = if again(Recompute::Rouge) {
        resolve_reference(&mut session, options, &columns).await?
    } else if has(&options.reference) {
        format!("CAST(runs.\"{}\" AS VARCHAR)", options.reference)
    } else {
        "CAST(NULL AS VARCHAR)".to_string()
    };
    let scores = if again(Recompute::Rouge) {
        format!("rouge({summary}, {reference}, {})", options.stem)
    } else {
        format!(
            "named_struct('{ROUGE1}', {}, '{ROUGE2}', {}, '{ROUGE_L}', {})",
            stored(ROUGE1),
            stored(ROUGE2),
            stored(ROUGE_L)
        )
    };
    let drift = if !again(Recompute::Drift) {
        stored(DRIFT)
    } else if options.encoder.is_none() && has("embedding") && has("summary_embedding") {
        "cosine(runs.embedding, runs.summary_embedding)".to_string()
    } else {
        // Filled in below with --encoder; without vectors there is nothing to compare.
        "CAST(NULL AS DOUBLE)".to_string()
    };
    let compression = if again(Recompute::Compression) {
        // Against the text the model saw, as the metrics stage measures it.
        match has("text_cut_chars") {
            true => format!(
                "compression({summary}, left(runs.text, \
                 CAST(character_length(runs.text) - coalesce(runs.text_cut_chars, 0) AS BIGINT)))"
            ),
            false => format!("compression({summary}, runs.text)"),
        }
    } else {
        stored(COMPRESSION)
    };
    let stability = stored(STABILITY);
    let optional = |name: &str| {
        if has(name) {
            format!("CAST(runs.\"{name}\" AS VARCHAR) AS \"{name}\"")
        } else {
            format!("CAST(NULL AS VARCHAR) AS \"{name}\"")
        }
    };
    let join = if options.reference_table.is_some() {
        "LEFT JOIN reference_table ON runs.id = CAST(reference_table.id AS VARCHAR)"
    } else {
        ""
    };
    let query = format!(
        "SELECT runs.run_id, runs.id, {topic}, {model}, {version}, runs.text, \
         {summary} AS summary, {reference} AS reference, {scores} AS scores, \
         {drift} AS drift, {compression} AS compression, {stability} AS stability \
         FROM runs {join} WHERE {summary} IS NOT NULL ORDER BY runs.run_id, runs.id",
        topic = optional("topic"),
        model = optional("model"),
        version = optional("prompt_version"),
    );
    let (_, mut batches) = session.query(&query).await?;
    if let (Some(dir), true) = (&options.encoder, again(Recompute::Drift)) {
        batches = embed_drift(dir, batches).await?;
    }
    let batches = batches
        .iter()
        .map(|b| with_measures(b, &thresholds))
        .collect::<Result<Vec<_>, _>>()?;
    let skipped = session
        .query(&format!(
            "SELECT CAST(run_id AS VARCHAR) AS run_id, count(*) AS n FROM runs \
             WHERE {summary} IS NULL GROUP BY run_id"
        ))
        .await?
        .1;

    let dir = match &options.out {
        Some(dir) => dir.clone(),
        None => options.runs.join("_eval").join(run::new_run_id()),
    };
    std::fs::create_dir_all(&dir).map_err(|source| PipelineError::Io {
        path: dir.clone(),
        source,
    })?;
    write_parquet(&dir.join("evaluation.parquet"), &batches)?;
    let mut runs = summarize_runs(&batches, &thresholds);
    for batch in &skipped {
        let ids = texts_of(batch.column(0))?;
        let counts = arrow::compute::cast(batch.column(1), &DataType::UInt64)?;
        let counts = counts.as_primitive::<arrow::datatypes::UInt64Type>();
        for (r, id) in ids.iter().enumerate() {
            if let Some(run) = runs.iter_mut().find(|s| Some(&s.run_id) == id.as_ref()) {
                run.without_summary = counts.value(r);
            }
        }
    }
    let summary = serde_json::json!({ "runs": runs });
    write_json(&dir.join("summary.json"), &summary)?;
    Ok(Evaluation { dir, runs, batches })
}

/// The SQL expression of the reference text: a column of the runs, or of the reference
/// table (registered here and joined on `id`), or why neither has it.
async fn resolve_reference(
    session: &mut SqlSession,
    options: &EvalOptions,
    columns: &[String],
) -> Result<String, PipelineError> {
    let Some(path) = &options.reference_table else {
        if columns.iter().any(|c| c == &options.reference) {
            return Ok(format!("CAST(runs.\"{}\" AS VARCHAR)", options.reference));
        }
        return Err(PipelineError::Usage(format!(
            "the runs have no `{}` column to compare summaries with (columns: {}); \
             name one with --reference or join one with --reference-table",
            options.reference,
            columns.join(", ")
        )));
    };
    session.register_path("reference_table", path).await?;
    let theirs = session.columns("reference_table").await?;
    for needed in ["id", options.reference.as_str()] {
        if !theirs.iter().any(|c| c == needed) {
            return Err(PipelineError::Usage(format!(
                "--reference-table {path}: no `{needed}` column (it has: {})",
                theirs.join(", ")
            )));
        }
    }
    Ok(format!(
        "CAST(reference_table.\"{}\" AS VARCHAR)",
        options.reference
    ))
}

/// `batches` with `drift` computed from vectors of `text` and `summary` that the encoder
/// in `dir` makes now.
async fn embed_drift(
    dir: &Path,
    batches: Vec<RecordBatch>,
) -> Result<Vec<RecordBatch>, PipelineError> {
    let model_error = |e: abridge_models::encoder::EncoderError| {
        PipelineError::Usage(format!("--encoder {}: {e}", dir.display()))
    };
    let path = dir.to_path_buf();
    let encoder = tokio::task::spawn_blocking(move || {
        BertEncoder::load(&path, &candle_core::Device::Cpu, 32)
    })
    .await
    .map_err(|e| PipelineError::Usage(format!("--encoder {}: {e}", dir.display())))?
    .map_err(model_error)?;
    let worker = EncoderWorker::spawn(Arc::new(encoder)).map_err(model_error)?;
    let dim = worker.dim();
    let mut out = Vec::with_capacity(batches.len());
    for batch in batches {
        let texts = worker
            .encode(text_column(&batch, "text"))
            .await
            .map_err(model_error)?;
        let summaries = worker
            .encode(text_column(&batch, "summary"))
            .await
            .map_err(model_error)?;
        let drift: Float64Array = texts
            .chunks(dim)
            .zip(summaries.chunks(dim))
            .map(|(a, b)| abridge_operators::quality::measures::cosine(a, b))
            .collect();
        let schema = batch.schema();
        let mut columns = batch.columns().to_vec();
        if let Ok(i) = schema.index_of(DRIFT) {
            columns[i] = Arc::new(drift);
        }
        out.push(RecordBatch::try_new(schema, columns)?);
    }
    Ok(out)
}

/// Column `name` of `batch` as text, "" for nulls (and for a missing or non-text column).
pub(crate) fn text_column(batch: &RecordBatch, name: &str) -> Vec<String> {
    batch
        .column_by_name(name)
        .and_then(|c| texts_of(c).ok())
        .map(|values| values.into_iter().map(Option::unwrap_or_default).collect())
        .unwrap_or_else(|| vec![String::new(); batch.num_rows()])
}

/// The values of a text column, whichever string type it has.
fn texts_of(array: &ArrayRef) -> Result<Vec<Option<String>>, PipelineError> {
    let strings = arrow::compute::cast(array, &DataType::Utf8)?;
    Ok(strings
        .as_string::<i32>()
        .iter()
        .map(|v| v.map(String::from))
        .collect())
}

/// The committed runs named (all when none is), or which name is unknown.
fn selected_runs(
    output: &Path,
    ids: &[String],
) -> Result<Vec<(PathBuf, run::RunManifest)>, PipelineError> {
    let runs = committed_runs(output).map_err(|source| PipelineError::Io {
        path: output.to_path_buf(),
        source,
    })?;
    if runs.is_empty() {
        return Err(PipelineError::Usage(format!(
            "{}: no committed run (is it a job's output.path?)",
            output.display()
        )));
    }
    if ids.is_empty() {
        return Ok(runs);
    }
    ids.iter()
        .map(|id| {
            runs.iter()
                .find(|(_, m)| &m.run_id == id)
                .cloned()
                .ok_or_else(|| {
                    let known: Vec<&str> = runs.iter().map(|(_, m)| m.run_id.as_str()).collect();
                    PipelineError::Usage(format!(
                        "run {id} is not a committed run of {} (runs: {})",
                        output.display(),
                        known.join(", ")
                    ))
                })
        })
        .collect()
}

/// `batch` with the `scores` struct spread into `rouge1`, `rouge2`, `rouge_l`, and the
/// `alerts` the measures raise under the thresholds of each row's run.
fn with_measures(
    batch: &RecordBatch,
    thresholds: &BTreeMap<String, AlertThresholds>,
) -> Result<RecordBatch, PipelineError> {
    let column = |name: &str| {
        batch
            .column_by_name(name)
            .ok_or_else(|| PipelineError::Usage(format!("evaluation lost its `{name}` column")))
    };
    let scores = column("scores")?.as_struct().clone();
    let measure = |name: &str| -> Result<Float64Array, PipelineError> {
        Ok(column(name)?.as_primitive::<Float64Type>().clone())
    };
    let (drift, compression, stability) =
        (measure(DRIFT)?, measure(COMPRESSION)?, measure(STABILITY)?);
    let run_ids = texts_of(column("run_id")?)?;
    let mut alerts = ListBuilder::new(StringBuilder::new());
    let get = |a: &Float64Array, r: usize| a.is_valid(r).then(|| a.value(r));
    for (r, run_id) in run_ids.iter().enumerate() {
        let run = run_id.as_ref().and_then(|id| thresholds.get(id));
        let run = run.copied().unwrap_or_default();
        let fired = run.alerts(get(&drift, r), get(&compression, r), get(&stability, r));
        alerts.append_value(fired.into_iter().map(Some));
    }
    let mut fields: Vec<Field> = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (field, array) in batch.schema().fields().iter().zip(batch.columns()) {
        if field.name() == "scores" {
            for (i, name) in [ROUGE1, ROUGE2, ROUGE_L].iter().enumerate() {
                fields.push(Field::new(*name, DataType::Float64, true));
                let values = scores.column(i).as_primitive::<Float64Type>();
                // A null struct (no reference) is null in each of its fields.
                let values: Float64Array = (0..values.len())
                    .map(|r| (scores.is_valid(r) && values.is_valid(r)).then(|| values.value(r)))
                    .collect();
                columns.push(Arc::new(values));
            }
        } else {
            fields.push(field.as_ref().clone());
            columns.push(Arc::clone(array));
        }
    }
    let alerts = alerts.finish();
    fields.push(Field::new(ALERTS, alerts.data_type().clone(), true));
    columns.push(Arc::new(alerts));
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}

/// Per-run means and alert counts.
fn summarize_runs(
    batches: &[RecordBatch],
    thresholds: &BTreeMap<String, AlertThresholds>,
) -> Vec<RunSummary> {
    let mut runs: Vec<RunSummary> = Vec::new();
    let mut sums: Vec<BTreeMap<&str, (f64, u64)>> = Vec::new();
    for batch in batches {
        let (Some(ids), Some(rouge_l), Some(alerts)) = (
            batch.column_by_name("run_id"),
            batch.column_by_name(ROUGE_L),
            batch.column_by_name(ALERTS),
        ) else {
            continue;
        };
        let ids = arrow::compute::cast(ids, &DataType::Utf8).ok();
        let Some(ids) = ids.as_ref().map(|a| a.as_string::<i32>()) else {
            continue;
        };
        let rouge_l = rouge_l.as_primitive::<Float64Type>();
        let alerts = alerts.as_list::<i32>();
        for r in 0..batch.num_rows() {
            let id = ids.value(r);
            if runs.last().is_none_or(|s| s.run_id != id) {
                runs.push(RunSummary {
                    run_id: id.to_string(),
                    summarized: 0,
                    without_summary: 0,
                    without_reference: 0,
                    means: BTreeMap::new(),
                    alerts: BTreeMap::new(),
                    thresholds: thresholds.get(id).copied().unwrap_or_default(),
                });
                sums.push(BTreeMap::new());
            }
            let (Some(run), Some(sum)) = (runs.last_mut(), sums.last_mut()) else {
                continue;
            };
            run.summarized += 1;
            run.without_reference += u64::from(rouge_l.is_null(r));
            for name in MEASURES {
                if let Some(values) = batch.column_by_name(name) {
                    let values = values.as_primitive::<Float64Type>();
                    if values.is_valid(r) {
                        let entry = sum.entry(name).or_insert((0.0, 0));
                        entry.0 += values.value(r);
                        entry.1 += 1;
                    }
                }
            }
            if alerts.is_valid(r) {
                for alert in alerts.value(r).as_string::<i32>().iter().flatten() {
                    *run.alerts.entry(alert.to_string()).or_insert(0) += 1;
                }
            }
        }
    }
    for (run, sum) in runs.iter_mut().zip(sums) {
        for name in MEASURES {
            let mean = sum.get(name).map(|(total, n)| total / *n as f64);
            run.means.insert(name.to_string(), mean);
        }
    }
    runs
}

fn write_parquet(path: &Path, batches: &[RecordBatch]) -> Result<(), PipelineError> {
    let file = std::fs::File::create(path).map_err(|source| PipelineError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let schema: SchemaRef = match batches.first() {
        Some(b) => b.schema(),
        None => Arc::new(Schema::empty()),
    };
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, None)?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.close()?;
    Ok(())
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), PipelineError> {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    std::fs::write(path, text + "\n").map_err(|source| PipelineError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// How two runs compare on the tickets both summarized.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The runs, as given.
    pub run_a: String,
    /// The second run.
    pub run_b: String,
    /// Tickets with a summary in both.
    pub shared: u64,
    /// Per measure: means on the shared tickets, and paired wins (higher is better for
    /// ROUGE and drift; compression and stability have no better side and get no count).
    pub measures: Vec<MeasureComparison>,
    /// Alerts raised on the shared tickets: (run A, run B).
    pub alerts: BTreeMap<String, (u64, u64)>,
}

/// One measure of a [`Comparison`].
#[derive(Debug, Clone, Serialize)]
pub struct MeasureComparison {
    /// The measure.
    pub measure: String,
    /// Mean in run A over the shared tickets that have it in both runs.
    pub mean_a: Option<f64>,
    /// Mean in run B, same tickets.
    pub mean_b: Option<f64>,
    /// Tickets where A scores higher, lower, the same (None where no side is better).
    pub a_wins: Option<u64>,
    /// Tickets where B scores higher.
    pub b_wins: Option<u64>,
    /// Tickets where both score the same.
    pub ties: Option<u64>,
}

/// Compares two runs of an evaluation, on the tickets both summarized.
pub async fn compare(
    evaluation: &Evaluation,
    run_a: &str,
    run_b: &str,
) -> Result<Comparison, PipelineError> {
    for run in [run_a, run_b] {
        if !evaluation.runs.iter().any(|r| r.run_id == run) {
            return Err(PipelineError::Usage(format!(
                "run {run} has no summarized rows in this evaluation"
            )));
        }
    }
    let mut session = SqlSession::new();
    session.register_batches("evaluation", &evaluation.batches)?;
    // Every measure's means and paired counts in one pass over the join.
    let mut select = vec!["count(*) AS shared".to_string()];
    for name in MEASURES {
        let (a, b) = (format!("a.\"{name}\""), format!("b.\"{name}\""));
        select.extend([
            format!("avg({a}) FILTER (WHERE {b} IS NOT NULL) AS \"{name}_mean_a\""),
            format!("avg({b}) FILTER (WHERE {a} IS NOT NULL) AS \"{name}_mean_b\""),
            format!("count(*) FILTER (WHERE {a} > {b}) AS \"{name}_a_wins\""),
            format!("count(*) FILTER (WHERE {a} < {b}) AS \"{name}_b_wins\""),
            format!("count(*) FILTER (WHERE {a} = {b}) AS \"{name}_ties\""),
        ]);
    }
    let query = format!(
        "SELECT {} FROM (SELECT * FROM evaluation WHERE run_id = '{a}') a \
         JOIN (SELECT * FROM evaluation WHERE run_id = '{b}') b ON a.id = b.id",
        select.join(", "),
        a = run_a.replace('\'', "''"),
        b = run_b.replace('\'', "''"),
    );
    let (_, batches) = session.query(&query).await?;
    let row = batches
        .into_iter()
        .find(|b| b.num_rows() == 1)
        .ok_or_else(|| PipelineError::Usage("the comparison query returned no row".into()))?;
    let int = |c: &str| {
        row.column_by_name(c)
            .and_then(|a| arrow::compute::cast(a, &DataType::UInt64).ok())
            .map(|a| a.as_primitive::<arrow::datatypes::UInt64Type>().value(0))
    };
    let float = |c: &str| {
        row.column_by_name(c)
            .map(|a| a.as_primitive::<Float64Type>().clone())
            .filter(|a| a.is_valid(0))
            .map(|a| a.value(0))
    };
    let shared = int("shared").unwrap_or(0);
    let measures = MEASURES
        .iter()
        .map(|name| {
            let paired = matches!(*name, ROUGE1 | ROUGE2 | ROUGE_L | DRIFT);
            let count = |what: &str| int(&format!("{name}_{what}")).filter(|_| paired);
            MeasureComparison {
                measure: name.to_string(),
                mean_a: float(&format!("{name}_mean_a")),
                mean_b: float(&format!("{name}_mean_b")),
                a_wins: count("a_wins"),
                b_wins: count("b_wins"),
                ties: count("ties"),
            }
        })
        .collect();
    let query = format!(
        "SELECT side, alert, count(*) AS n FROM ( \
           SELECT 'a' AS side, unnest(a.alerts) AS alert FROM \
             (SELECT * FROM evaluation WHERE run_id = '{a}') a \
             JOIN (SELECT id FROM evaluation WHERE run_id = '{b}') b ON a.id = b.id \
           UNION ALL \
           SELECT 'b' AS side, unnest(b.alerts) AS alert FROM \
             (SELECT * FROM evaluation WHERE run_id = '{b}') b \
             JOIN (SELECT id FROM evaluation WHERE run_id = '{a}') a ON a.id = b.id) \
         GROUP BY side, alert",
        a = run_a.replace('\'', "''"),
        b = run_b.replace('\'', "''"),
    );
    let (_, batches) = session.query(&query).await?;
    let mut alerts: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for batch in &batches {
        let side = arrow::compute::cast(batch.column(0), &DataType::Utf8)?;
        let alert = arrow::compute::cast(batch.column(1), &DataType::Utf8)?;
        let n = arrow::compute::cast(batch.column(2), &DataType::UInt64)?;
        let (side, alert) = (side.as_string::<i32>(), alert.as_string::<i32>());
        let n = n.as_primitive::<arrow::datatypes::UInt64Type>();
        for r in 0..batch.num_rows() {
            let entry = alerts.entry(alert.value(r).to_string()).or_insert((0, 0));
            if side.value(r) == "a" {
                entry.0 += n.value(r);
            } else {
                entry.1 += n.value(r);
            }
        }
    }
    Ok(Comparison {
        run_a: run_a.to_string(),
        run_b: run_b.to_string(),
        shared,
        measures,
        alerts,
    })
}
