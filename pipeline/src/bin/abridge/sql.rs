//! `abridge sql`: a query over the job's output table and named Parquet files.

use std::path::PathBuf;
use std::sync::Arc;

use abridge_pipeline::PipelineError;
use abridge_pipeline::job::Job;
use abridge_pipeline::sql::model_functions::{ModelAccounting, ModelFunctions, ModelOptions};
use abridge_pipeline::sql::result_cache::ResultCache;
use abridge_pipeline::sql::{OutputFormat, SqlSession, write_results};
use anyhow::Context;
use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

use crate::args::{DEFAULT_JOB, SqlArgs};

pub async fn sql(args: SqlArgs) -> anyhow::Result<()> {
    if args.format == OutputFormat::Parquet && args.out.is_none() {
        return Err(PipelineError::Usage("--format parquet needs --out FILE".into()).into());
    }
    let mut session = match args.threads {
        Some(threads) => SqlSession::with_threads(threads),
        None => SqlSession::new(),
    };
    let job_path = match args.job {
        Some(job) => Some(job),
        None => Some(PathBuf::from(DEFAULT_JOB)).filter(|p| p.exists()),
    };
    if let Some(path) = &job_path {
        let job = Job::load(path, &[]).map_err(PipelineError::from)?;
        session
            .register_output(&job.config.output.path, args.run_group.as_deref())
            .await?;
        let options = ModelOptions {
            fail_on_error: args.fail_on_error,
            max_model_rows: args.max_model_rows,
        };
        let cache = ResultCache::new(
            (!args.no_cache).then(|| abridge_models::cache_dir().join("sql-results")),
            args.cache_max_mib.saturating_mul(1 << 20),
        );
        let functions = ModelFunctions::new(
            job.config.summarize.clone(),
            job.config.embed.clone(),
            options,
            cache,
        );
        session.with_models(functions, job);
    }
    for table in &args.tables {
        let (name, path) = table
            .split_once('=')
            .ok_or_else(|| PipelineError::Usage(format!("--table {table}: expected NAME=PATH")))?;
        session.register_path(name.trim(), path.trim()).await?;
    }
    // Ctrl-C or SIGTERM stops the query; the answers the models gave are kept either way.
    let result = tokio::select! {
        result = session.query(&args.query) => result,
        signal = stop_signal() => Err(PipelineError::QueryInterrupted { signal: signal? }),
    };
    let kept = session.keep_answers();
    if let Some(accounting) = session.model_accounting() {
        report_models(&accounting);
    }
    if let Err(e) = kept {
        tracing::warn!("model result cache: {e} (the last answers are not kept)");
    }
    let (schema, batches) = match result {
        Ok(result) => result,
        Err(err) => {
            let text = err.to_string();
            let has_defaults = session.tables().iter().any(|t| t == "summaries");
            let missing = ["summaries", "runs"]
                .iter()
                .any(|t| text.contains(&format!("{t}' not found")));
            if has_defaults || !missing {
                return Err(err.into());
            }
            let hint = match &job_path {
                Some(job) => format!(
                    "no committed run of {} yet: run `abridge run {}` first",
                    job.display(),
                    job.display()
                ),
                None => format!(
                    "no job given and no {DEFAULT_JOB} here: pass --job or --table NAME=PATH"
                ),
            };
            return Err(anyhow::Error::new(err).context(hint));
        }
    };
    // A Parquet result carries what its model calls cost in its schema's metadata.
    let accounting = session
        .model_accounting()
        .filter(|a| a.model_calls + a.cache_hits > 0);
    let (schema, batches) = match accounting {
        Some(a) if args.format == OutputFormat::Parquet => with_accounting(&schema, batches, &a)?,
        _ => (schema, batches),
    };
    match &args.out {
        Some(path) => {
            let file = std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?;
            write_results(
                &schema,
                &batches,
                args.format,
                std::io::BufWriter::new(file),
            )?;
        }
        None => {
            let stdout = std::io::BufWriter::new(std::io::stdout());
            write_results(&schema, &batches, args.format, stdout)?;
        }
    }
    Ok(())
}

/// `schema` and `batches` with `accounting` as JSON under the schema metadata key
/// `abridge.model_accounting`.
fn with_accounting(
    schema: &SchemaRef,
    batches: Vec<RecordBatch>,
    accounting: &ModelAccounting,
) -> anyhow::Result<(SchemaRef, Vec<RecordBatch>)> {
    let mut metadata = schema.metadata().clone();
    metadata.insert(
        "abridge.model_accounting".into(),
        serde_json::to_string(accounting)?,
    );
    let schema = Arc::new(schema.as_ref().clone().with_metadata(metadata));
    let batches = batches
        .into_iter()
        .map(|b| b.with_schema(Arc::clone(&schema)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((schema, batches))
}

/// What the query's model calls cost, as a log event (fields with `--log-format json`);
/// nothing for a query that called none.
fn report_models(a: &ModelAccounting) {
    if a.model_calls + a.cache_hits == 0 {
        return;
    }
    let tokens = match a.prompt_tokens + a.completion_tokens {
        0 => String::new(),
        _ => format!(
            ", {} prompt tokens in, {} generated",
            a.prompt_tokens, a.completion_tokens
        ),
    };
    tracing::info!(
        model_calls = a.model_calls,
        cache_hits = a.cache_hits,
        failed = a.failed,
        prompt_tokens = a.prompt_tokens,
        completion_tokens = a.completion_tokens,
        model_ms = a.model_ms,
        engine_prefills = a.engine_prefills,
        engine_steps = a.engine_steps,
        "models: {} calls, {} answered from the cache{tokens}, {:.1} s model time",
        a.model_calls,
        a.cache_hits,
        a.model_ms as f64 / 1000.0
    );
    if let Some(first) = &a.first_error {
        tracing::warn!(
            failed = a.failed,
            "{} inputs failed (NULL; the try_ forms give the reason), the first: {first}",
            a.failed
        );
    }
}

/// The first SIGINT or SIGTERM: its number.
async fn stop_signal() -> anyhow::Result<i32> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    Ok(tokio::select! {
        _ = interrupt.recv() => 2,
        _ = terminate.recv() => 15,
    })
}
