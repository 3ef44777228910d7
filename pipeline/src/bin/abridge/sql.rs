//! `abridge sql`: a query over the job's output table and named Parquet files.

use std::path::PathBuf;

use abridge_pipeline::PipelineError;
use abridge_pipeline::job::Job;
use abridge_pipeline::sql::{OutputFormat, SqlSession, write_results};
use anyhow::Context;

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
        session.register_output(&job.config.output.path).await?;
    }
    for table in &args.tables {
        let (name, path) = table
            .split_once('=')
            .ok_or_else(|| PipelineError::Usage(format!("--table {table}: expected NAME=PATH")))?;
        session.register_path(name.trim(), path.trim()).await?;
    }
    let (schema, batches) = match session.query(&args.query).await {
        Ok(result) => result,
        Err(err) => {
            let text = err.to_string();
            let has_defaults = session.tables().iter().any(|t| t == "summaries");
            if has_defaults || !(text.contains("summaries") || text.contains("runs")) {
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
