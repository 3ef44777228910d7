//! The command line: every subcommand's flags, their defaults and their help text.

use std::path::{Path, PathBuf};

use abridge_pipeline::PipelineError;
use abridge_pipeline::eval::Recompute;
use abridge_pipeline::search::SearchMode;
use abridge_pipeline::sql::OutputFormat;
use clap::{Args, Parser, Subcommand};

use crate::logging::LogFormat;

/// Summarize large tables of documents with small language models.
///
/// abridge reads tickets (or news, reports) from Parquet, processes them in a streaming
/// pipeline described by a job file, and writes the results as a new run of a Parquet
/// output table that `abridge sql` can query.
#[derive(Parser)]
#[command(name = "abridge", version, propagate_version = true, after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// How notes, progress lines, signals and errors are written to stderr: `text` for
    /// people, `json` for schedulers that collect logs (one object per line, with the
    /// run id and counts as fields; `run` then logs progress instead of drawing a bar).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run a job: read its input, process every ticket, write a new run of its output table.
    ///
    /// The run is written to OUTPUT/run_id=<id>/ (OUTPUT is the job's output.path) with
    /// the resolved job (_job.toml) and a manifest of counts and timings (_run.json).
    ///
    /// Examples:
    ///   abridge run jobs/demo.toml
    ///   abridge run jobs/demo.toml --limit 100 --set output.path=/tmp/try
    ///   abridge run jobs/nightly.toml --set "input.where=language = 'zh'" --json
    ///
    /// Rows are committed in files of output.commit_every_rows rows, or every
    /// output.commit_every_s seconds on a slow run: a killed run, run again, keeps what
    /// it committed and does the rest. SIGTERM or Ctrl-C stops reading input, lets the
    /// rows in flight finish and commit for up to run.stop_grace_s seconds, and exits
    /// 143 or 130; a second signal stops at once (nothing half-written is kept).
    #[command(verbatim_doc_comment, after_help = EXIT_CODES)]
    Run(RunArgs),
    /// Run read-only SQL over output tables and any Parquet files.
    ///
    /// With a job (default: jobs/demo.toml when it exists) its output table is registered:
    /// `summaries` is its latest committed run, `runs` all its committed runs. More tables
    /// come from --table NAME=PATH (a Parquet file, a folder or a glob).
    ///
    /// Functions: rouge_n, rouge_l, rouge, cosine, compression (the run's measures), and the
    /// job's models, loaded only when a query calls them: summarize(text [, prompt]) with
    /// its [summarize] settings (prompt: a preset or a template using {text}), embed(text)
    /// with its [embed] encoder, classify(text, ['label', ...]) with its [summarize] model
    /// (always one of the labels: decoding is restricted to their tokens),
    /// extract_fields(text, 'name, ...') (a struct of those fields from the model's
    /// `name: value` lines, parsed strictly), and the try_ forms of each, which return
    /// {result, error}. Rows go to the models in batches (the job's in_flight); answers
    /// are cached (the job's latest run, if made with the same settings, and
    /// $ABRIDGE_CACHE/sql-results), so asking again calls no model. A row a model fails
    /// on is NULL (its reason in try_*'s error). Model calls, cache hits, tokens and model
    /// time are reported on stderr (and, with --format parquet, in the file's metadata:
    /// abridge.model_accounting).
    ///
    /// Examples:
    ///   abridge sql "SELECT category, count(*) FROM summaries GROUP BY category"
    ///   abridge sql "SELECT run_id, count(*) FROM runs GROUP BY run_id"
    ///   abridge sql "SELECT * FROM t LIMIT 5" --table t=data/tickets.parquet --format json
    ///   abridge sql "SELECT id, text FROM summaries" --format parquet --out ids.parquet
    ///   abridge sql "SELECT id, summarize(text) FROM summaries WHERE NOT kept LIMIT 8"
    ///   abridge sql "SELECT id, cosine(embed('printer jam'), embedding) AS s FROM summaries ORDER BY s DESC LIMIT 5"
    ///   abridge sql "SELECT classify(text, ['hardware', 'network', 'accounts']) AS c, count(*) FROM summaries GROUP BY c"
    #[command(verbatim_doc_comment, after_help = EXIT_CODES)]
    Sql(SqlArgs),
    /// Search a job's index: by words (BM25), by meaning (sentence vectors), or both.
    ///
    /// The index is the one the job's [index] section names (default job: jobs/demo.toml
    /// when it exists) or a folder given with --index; it holds every ticket of the job's
    /// committed runs. Hybrid mode fuses the BM25 and vector rankings by reciprocal rank;
    /// vector and hybrid modes embed the query with the encoder that built the index.
    /// Chinese queries work in every mode (BM25 indexes one token per CJK character).
    ///
    /// Examples:
    ///   abridge search "printer prints blank pages"
    ///   abridge search "打印机无法连接" --k 5 --format json
    ///   abridge search "invoice charged twice" --mode bm25 --index out/demo-index
    #[command(verbatim_doc_comment)]
    Search(SearchArgs),
    /// Measure historical runs again, and compare two runs on the tickets both summarized.
    ///
    /// Reads the committed runs of an output table (all, or those named with --run),
    /// recomputes ROUGE against a reference (a column of the runs, or of another table
    /// joined on id), compression, drift (from the stored vectors) and the alerts, and
    /// writes a new evaluation table: RUNS/_eval/<id>/evaluation.parquet, summary.json,
    /// and report.html (a self-contained page of plots and the worst summaries).
    /// The runs themselves are never written. With --compare, prints per measure the means
    /// on the shared tickets and the paired wins (higher ROUGE or drift wins).
    ///
    /// Examples:
    ///   abridge eval --runs out/demo
    ///   abridge eval --runs out/demo --reference-table gold.parquet --reference summary --stem
    ///   abridge eval --runs out/demo --compare RUN_A RUN_B --json
    #[command(verbatim_doc_comment)]
    Eval(EvalArgs),
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
    /// Show the live and recent runs of a job's output table: state, rows, rate, ETA and
    /// the process writing it.
    ///
    /// Reads the run folders' manifests (refreshed at every commit) and the output's lock
    /// files, so it works from any shell or pod that sees the output folder. States:
    /// running (a live process holds it), stopped (killed: its next run continues it),
    /// interrupted (by a signal: likewise), failed, committed.
    ///
    /// Examples:
    ///   abridge status jobs/nightly.toml
    ///   watch -n 10 abridge status jobs/nightly.toml
    ///   abridge status --output /data/out/nightly --json
    #[command(verbatim_doc_comment)]
    Status(StatusArgs),
    /// Show or clear the cache of SQL model answers ($ABRIDGE_CACHE/sql-results).
    ///
    /// Shows its files, size and answers kept, and, over the queries that used it, their
    /// model calls and the answers found cached. `abridge sql` keeps answers as they come
    /// and holds the folder under --cache-max-mib (default 2048), the oldest going first.
    ///
    /// Examples:
    ///   abridge cache
    ///   abridge cache --clear
    #[command(verbatim_doc_comment)]
    Cache(CacheArgs),
    /// Check the paged KV cache and PagedAttention's kernels on a device against plain
    /// attention on the host (a GPU build's first check, `scripts/gpu-check`).
    #[command(hide = true)]
    CheckKernels(CheckKernelsArgs),
}

#[derive(Args)]
pub struct StatusArgs {
    /// The job whose output table to show [default: jobs/demo.toml when it exists].
    #[arg(conflicts_with = "output")]
    pub job: Option<PathBuf>,
    /// An output folder (a job's output.path) instead of a job.
    #[arg(long, value_name = "DIR")]
    pub output: Option<PathBuf>,
    /// How many of the newest runs to show.
    #[arg(long, default_value_t = 10)]
    pub last: usize,
    /// Print the runs as a JSON array.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct RunArgs {
    /// The job file (TOML).
    pub job: PathBuf,
    /// Override a job-file key, e.g. --set input.path=other.parquet (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Read at most N input rows (after input.where).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
    /// No progress and no summary; errors only.
    #[arg(long, short)]
    pub quiet: bool,
    /// Print the run's manifest as JSON on stdout when it ends.
    #[arg(long)]
    pub json: bool,
    /// Continue the job's unfinished run (killed, failed or interrupted): rows its earlier
    /// attempts committed are kept, the rest are processed. Without this flag a run still
    /// continues an unfinished run of the same job, and says so; with it, having nothing
    /// to continue is an error.
    #[arg(long, conflicts_with = "fresh")]
    pub resume: bool,
    /// Start a new run even if the last one did not finish (it is left as it was).
    #[arg(long)]
    pub fresh: bool,
    /// Process only shard I of N (0 ≤ I < N): the tickets whose stable id hash falls in
    /// it. The N shards, run anywhere, together process the input once; their output
    /// folders form one run of the table. Needs --run-group.
    #[arg(long, value_name = "I/N", value_parser = parse_shard, requires = "run_group")]
    pub shard: Option<(u32, u32)>,
    /// The name the shards of one run share (e.g. the scheduler's job name or the night's
    /// date). A shard's folder is run_id=GROUP.IofN; rerunning it resumes it.
    #[arg(long, value_name = "NAME", requires = "shard", value_parser = parse_group)]
    pub run_group: Option<String>,
}

pub fn parse_shard(value: &str) -> Result<(u32, u32), String> {
    let (i, n) = value
        .split_once('/')
        .ok_or_else(|| format!("`{value}`: expected I/N, e.g. 0/4"))?;
    let number = |s: &str| {
        s.trim()
            .parse::<u32>()
            .map_err(|_| format!("`{value}`: `{s}` is not a whole number"))
    };
    let (i, n) = (number(i)?, number(n)?);
    if n == 0 || i >= n {
        return Err(format!(
            "`{value}`: the shard number must be below the shard count (0 ≤ I < N)"
        ));
    }
    Ok((i, n))
}

pub fn parse_group(value: &str) -> Result<String, String> {
    let fine = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    match fine {
        true => Ok(value.to_string()),
        false => Err(format!(
            "`{value}`: use letters, digits, `-`, `_` and `.` (it names a folder)"
        )),
    }
}

#[derive(Args)]
pub struct SqlArgs {
    /// The SQL query.
    pub query: String,
    /// Register a Parquet file, folder or glob as a table (repeatable).
    #[arg(long = "table", value_name = "NAME=PATH")]
    pub tables: Vec<String>,
    /// The job whose output table is registered as `summaries` and `runs`
    /// [default: jobs/demo.toml when it exists].
    #[arg(long, value_name = "JOB.toml")]
    pub job: Option<PathBuf>,
    /// How to print the result.
    #[arg(long, value_enum, default_value = "table")]
    pub format: OutputFormat,
    /// Write the result to this file instead of stdout (required for parquet).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Threads the query may use [default: one per core].
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Refuse a query that would send more than N inputs to models (cached ones do not
    /// count; 0: no limit). The query is counted first, without calling any model.
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub max_model_rows: usize,
    /// Fail the query when a model fails on a row, instead of NULL for that row.
    #[arg(long)]
    pub fail_on_error: bool,
    /// Neither read nor keep cached model answers: every input goes to its model (an
    /// input repeated within the query is still asked once).
    #[arg(long)]
    pub no_cache: bool,
    /// Read this shard group as `summaries`, even before all its shards have committed
    /// (by default `summaries` is the latest complete run, and a newer group still
    /// running is named on stderr).
    #[arg(long, value_name = "NAME")]
    pub run_group: Option<String>,
    /// The most the answer cache ($ABRIDGE_CACHE/sql-results) may take, in MiB; past it
    /// the oldest answers go first. See `abridge cache`.
    #[arg(long, value_name = "MIB", default_value_t = 2048)]
    pub cache_max_mib: u64,
}

#[derive(Args)]
pub struct CacheArgs {
    /// Remove every cached answer (and the log of queries).
    #[arg(long)]
    pub clear: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct CheckKernelsArgs {
    /// Where the cache lives: `cuda`, `cuda:N`, or `cpu` (the host's own block gather).
    #[arg(long, default_value = "cuda")]
    pub device: String,
    /// The cache's types to check (repeatable).
    #[arg(
        long = "dtype",
        value_name = "TYPE",
        value_parser = ["float32", "float16", "bfloat16"],
        default_values = ["float32", "float16", "bfloat16"]
    )]
    pub dtypes: Vec<String>,
    /// The largest difference allowed [default: 1e-4 in float32, 2e-3 in float16, 1e-2 in
    /// bfloat16: the contexts are rounded to the type].
    #[arg(long)]
    pub tolerance: Option<f32>,
}

#[derive(Args)]
pub struct EvalArgs {
    /// The output table (a job's output.path) whose runs to evaluate.
    #[arg(long, value_name = "DIR")]
    pub runs: PathBuf,
    /// A run to evaluate (repeatable) [default: every committed run].
    #[arg(long = "run", value_name = "ID")]
    pub run_ids: Vec<String>,
    /// The reference column, in the runs or in --reference-table.
    #[arg(long, value_name = "COLUMN", default_value = "reference")]
    pub reference: String,
    /// The column to measure (another model's output carried in the runs, say).
    #[arg(long, value_name = "COLUMN", default_value = "summary")]
    pub summary: String,
    /// A Parquet file, folder or glob holding `id` and the reference column.
    #[arg(long, value_name = "PATH")]
    pub reference_table: Option<String>,
    /// Porter-stem words before ROUGE (rouge-score's use_stemmer).
    #[arg(long)]
    pub stem: bool,
    /// The measures to compute again; the others are read from the runs.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "rouge,drift,compression"
    )]
    pub recompute: Vec<Recompute>,
    /// Embed text and summary again with this encoder folder for drift (default: the
    /// vectors stored in the runs).
    #[arg(long, value_name = "DIR")]
    pub encoder: Option<PathBuf>,
    /// Compare two runs on the tickets both summarized.
    #[arg(long, num_args = 2, value_names = ["RUN_A", "RUN_B"])]
    pub compare: Vec<String>,
    /// Where to write the evaluation [default: RUNS/_eval/<id>].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Alert when drift is below this [default: each run's own `[metrics.alerts]`].
    #[arg(long, value_name = "X")]
    pub drift_min: Option<f64>,
    /// Alert when compression is below this [default: each run's own].
    #[arg(long, value_name = "X")]
    pub compression_min: Option<f64>,
    /// Alert when compression is above this [default: each run's own].
    #[arg(long, value_name = "X")]
    pub compression_max: Option<f64>,
    /// Alert when stability is above this [default: each run's own].
    #[arg(long, value_name = "X")]
    pub stability_max: Option<f64>,
    /// Print the summary (and comparison) as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct SearchArgs {
    /// What to look for, in any words.
    pub query: String,
    /// The job whose index to search [default: jobs/demo.toml when it exists].
    #[arg(long, value_name = "JOB.toml", conflicts_with = "index")]
    pub job: Option<PathBuf>,
    /// An index folder to search instead of a job's.
    #[arg(long, value_name = "DIR")]
    pub index: Option<PathBuf>,
    /// Number of results.
    #[arg(long, short, default_value_t = 10)]
    pub k: usize,
    /// How to rank.
    #[arg(long, value_enum, default_value = "hybrid")]
    pub mode: SearchMode,
    /// How to print the hits: an aligned table, or a JSON array of objects with id,
    /// score, title, text, topic and run_id.
    #[arg(long, value_enum, default_value = "table")]
    pub format: HitFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum HitFormat {
    Table,
    Json,
}

#[derive(Args)]
pub struct SampleArgs {
    /// Number of tickets.
    #[arg(long, default_value_t = 1000)]
    pub rows: usize,
    /// Seed: the same seed gives the same table.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// The Parquet file to write.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// No duplicate ids and no empty bodies.
    #[arg(long)]
    pub clean: bool,
}

pub const DEFAULT_JOB: &str = "jobs/demo.toml";

/// `job`, or [`DEFAULT_JOB`] when none was given and it exists; otherwise a usage error
/// that says what to `pass` instead.
pub fn job_or_default(job: Option<&PathBuf>, pass: &str) -> Result<PathBuf, PipelineError> {
    match job {
        Some(job) => Ok(job.clone()),
        None if Path::new(DEFAULT_JOB).exists() => Ok(PathBuf::from(DEFAULT_JOB)),
        None => Err(PipelineError::Usage(format!(
            "no job given and no {DEFAULT_JOB} here: pass {pass}"
        ))),
    }
}

/// What each exit code means, for schedulers (`--help` of abridge and of `abridge run`).
pub const EXIT_CODES: &str = "\
Exit codes:
  0    done (a run: committed)
  1    failed on its data or environment (a run keeps what it committed; run it again to continue)
  2    usage, job-file or SQL error: fix the command
  3    committed, but some input files could not be read (named in _run.json)
  75   another live run holds the output's lock, or took it over from this one: retry later
  130  stopped by SIGINT (Ctrl-C), 143 by SIGTERM: run it again to continue";
