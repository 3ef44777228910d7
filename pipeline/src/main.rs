//! The `abridge` command: parses flags, runs the library, maps errors to exit codes
//! (0 ok, 1 the job failed, 2 bad usage or bad job file).

use std::path::PathBuf;
use std::process::ExitCode;

use abridge_pipeline::PipelineError;
use abridge_pipeline::executor::{self, RunOptions};
use abridge_pipeline::job::Job;
use abridge_pipeline::progress::{ProgressMode, ProgressReporter};
use abridge_pipeline::run::RunManifest;
use abridge_pipeline::sample::{SampleOptions, write_sample};
use abridge_pipeline::sql::{OutputFormat, SqlSession, write_results};
use anyhow::Context;
use clap::{Args, Parser, Subcommand};

/// Summarize large tables of documents with small language models.
///
/// abridge reads tickets (or news, reports) from Parquet, processes them in a streaming
/// pipeline described by a job file, and writes the results as a new run of a Parquet
/// output table that `abridge sql` can query.
#[derive(Parser)]
#[command(name = "abridge", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a job: read its input, process every ticket, write a new run of its output table.
    ///
    /// The run is written to OUTPUT/run_id=<id>/ (OUTPUT is the job's output.path) with
    /// the resolved job (_job.toml) and a manifest of counts and timings (_run.json).
    ///
    /// Examples:
    ///   abridge run jobs/demo.toml
    ///   abridge run jobs/demo.toml --limit 100 --set output.path=/tmp/try
    ///   abridge run jobs/nightly.toml --set "input.where=language = 'zh'" --json
    Run(RunArgs),
    /// Run read-only SQL over output tables and any Parquet files.
    ///
    /// With a job (default: jobs/demo.toml when it exists) its output table is registered:
    /// `summaries` is its latest committed run, `runs` all its committed runs. More tables
    /// come from --table NAME=PATH (a Parquet file, a folder or a glob).
    ///
    /// Examples:
    ///   abridge sql "SELECT category, count(*) FROM summaries GROUP BY category"
    ///   abridge sql "SELECT run_id, count(*) FROM runs GROUP BY run_id"
    ///   abridge sql "SELECT * FROM t LIMIT 5" --table t=data/tickets.parquet --format json
    ///   abridge sql "SELECT id, text FROM summaries" --format parquet --out ids.parquet
    Sql(SqlArgs),
    /// Write a synthetic ticket table (English and Chinese help-desk tickets with reference
    /// summaries), the same for the same seed.
    ///
    /// Columns: ticket_id, subject, body, category, priority, status, language, customer,
    /// opened_at, resolution_summary. Like real exports, about 1% of rows re-send an
    /// earlier ticket and 1% have an empty body (leave them out with --clean).
    ///
    /// Example:
    ///   abridge sample --rows 100000 --seed 7 --out data/tickets-100k.parquet
    Sample(SampleArgs),
}

#[derive(Args)]
struct RunArgs {
    /// The job file (TOML).
    job: PathBuf,
    /// Override a job-file key, e.g. --set input.path=other.parquet (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Read at most N input rows (after input.where).
    #[arg(long, value_name = "N")]
    limit: Option<usize>,
    /// No progress and no summary; errors only.
    #[arg(long, short)]
    quiet: bool,
    /// Print the run's manifest as JSON on stdout when it ends.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SqlArgs {
    /// The SQL query.
    query: String,
    /// Register a Parquet file, folder or glob as a table (repeatable).
    #[arg(long = "table", value_name = "NAME=PATH")]
    tables: Vec<String>,
    /// The job whose output table is registered as `summaries` and `runs`
    /// [default: jobs/demo.toml when it exists].
    #[arg(long, value_name = "JOB.toml")]
    job: Option<PathBuf>,
    /// How to print the result.
    #[arg(long, value_enum, default_value = "table")]
    format: OutputFormat,
    /// Write the result to this file instead of stdout (required for parquet).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
}

#[derive(Args)]
struct SampleArgs {
    /// Number of tickets.
    #[arg(long, default_value_t = 1000)]
    rows: usize,
    /// Seed: the same seed gives the same table.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// The Parquet file to write.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// No duplicate ids and no empty bodies.
    #[arg(long)]
    clean: bool,
}

const DEFAULT_JOB: &str = "jobs/demo.toml";

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Sql(args) => sql(args).await,
            Command::Sample(args) => sample(&args),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", message(&err));
            let code = err
                .chain()
                .find_map(|e| e.downcast_ref::<PipelineError>())
                .map_or(1, PipelineError::exit_code);
            ExitCode::from(code)
        }
    }
}

/// The error and its causes, each cause only where the text so far does not already say it
/// (library errors name their source in their own message).
fn message(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    let job = Job::load(&args.job, &args.set).map_err(PipelineError::from)?;
    let options = RunOptions { limit: args.limit };
    let prepared = executor::prepare(job, &options).await?;
    let mode = ProgressMode::detect(args.quiet || args.json);
    if mode != ProgressMode::Off {
        eprintln!(
            "run {} → {}",
            prepared.run_id(),
            prepared.run_dir().display()
        );
    }
    let reporter = ProgressReporter::start(prepared.progress(), mode);
    let result = prepared.execute().await;
    reporter.finish().await;
    let manifest = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&manifest)?);
    } else if !args.quiet {
        eprint!("{}", summary(&manifest));
    }
    Ok(())
}

fn summary(m: &RunManifest) -> String {
    let mut out = format!(
        "run {} committed in {:.1}s: {} rows read, {} written ({} with errors), {} duplicates dropped\n",
        m.run_id, m.elapsed_s, m.rows_read, m.rows_written, m.rows_failed, m.duplicates_dropped
    );
    out.push_str(&format!(
        "  {:<10} {:>10} {:>10} {:>8} {:>8} {:>9}\n",
        "stage", "rows in", "rows out", "failed", "dropped", "busy ms"
    ));
    for s in &m.stages {
        let x = &s.metrics;
        out.push_str(&format!(
            "  {:<10} {:>10} {:>10} {:>8} {:>8} {:>9}\n",
            s.stage, x.rows_in, x.rows_out, x.rows_failed, x.rows_dropped, x.busy_ms
        ));
    }
    out
}

async fn sql(args: SqlArgs) -> anyhow::Result<()> {
    if args.format == OutputFormat::Parquet && args.out.is_none() {
        return Err(PipelineError::Usage("--format parquet needs --out FILE".into()).into());
    }
    let mut session = SqlSession::new();
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

fn sample(args: &SampleArgs) -> anyhow::Result<()> {
    let options = SampleOptions {
        rows: args.rows,
        seed: args.seed,
        clean: args.clean,
    };
    write_sample(&options, &args.out)?;
    eprintln!(
        "wrote {} tickets (seed {}) to {}",
        args.rows,
        args.seed,
        args.out.display()
    );
    Ok(())
}
