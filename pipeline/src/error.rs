use std::path::{Path, PathBuf};

use abridge_models::encoder::EncoderError;
use abridge_operators::OperatorError;
use datafusion::error::DataFusionError;

use crate::job::JobError;

/// Why a command failed, and whose move it is (see [`PipelineError::exit_code`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// The job file or an override is wrong.
    #[error(transparent)]
    Job(#[from] JobError),
    /// The job does not fit its input (mapping, types, `where` clause).
    #[error("job {job}: {source}")]
    JobDoesNotFitInput {
        /// The job file.
        job: PathBuf,
        /// What did not fit.
        source: Box<OperatorError>,
    },
    /// Another live run holds the output folder's lock.
    #[error(
        "output {} is being written by {holder}; if that run is not running any more, delete {}",
        output.display(),
        lock.display()
    )]
    Locked {
        /// The output folder.
        output: PathBuf,
        /// Who holds it.
        holder: String,
        /// The lock file.
        lock: PathBuf,
    },
    /// The run committed what it read, but some input files could not be read (each
    /// with its error in `_run.json`'s `input_files_failed`).
    #[error(
        "run {run_id} committed, but {} input file(s) could not be read: {}",
        files.len(),
        files.join("; ")
    )]
    InputFilesSkipped {
        /// The run.
        run_id: String,
        /// Each skipped file with its error.
        files: Vec<String>,
    },
    /// A model named by the job cannot be loaded (missing folder or file, wrong architecture).
    #[error("job {job}: {source}")]
    Model {
        /// The job file.
        job: PathBuf,
        /// What went wrong.
        source: Box<OperatorError>,
    },
    /// The input cannot be read (missing, unreadable or corrupt files).
    #[error("job {job}: {source}")]
    Input {
        /// The job file.
        job: PathBuf,
        /// What went wrong.
        source: Box<OperatorError>,
    },
    /// The job's index cannot be opened, written or searched.
    #[error(transparent)]
    Index(Box<abridge_operators::index::IndexError>),
    /// The run started and then failed; files already finished are intact.
    #[error("run {run_id} failed (finished files kept in {}): {source}", run_dir.display())]
    RunFailed {
        /// The run's id.
        run_id: String,
        /// The run's folder.
        run_dir: PathBuf,
        /// Why.
        source: Box<OperatorError>,
    },
    /// A signal stopped the run (or stopped it before it began writing); what it
    /// published is intact and the next run of the job continues it.
    #[error("{}", interrupted_message(*signal, run.as_ref()))]
    Interrupted {
        /// The signal's number (SIGINT 2, SIGTERM 15), when a signal stopped it.
        signal: Option<i32>,
        /// The run's id and folder, when it had begun writing.
        run: Option<(String, PathBuf)>,
    },
    /// A signal stopped a query; the model answers it had are kept in the cache.
    #[error(
        "query interrupted by {} (the model answers it had are kept in the cache: asking \
         again reuses them)",
        signal_name(Some(*signal))
    )]
    QueryInterrupted {
        /// The signal's number (SIGINT 2, SIGTERM 15).
        signal: i32,
    },
    /// The run's lock was lost (removed, taken over, or its heartbeat failed), so it
    /// stopped at once; what it committed is kept.
    #[error("stopped at once: {reason}")]
    LockLost {
        /// What happened to the lock.
        reason: String,
    },
    /// A filesystem operation failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// An `abridge sql` statement would write or change something.
    #[error("abridge sql is read-only: {0}")]
    ReadOnly(String),
    /// An `abridge sql` statement does not plan: a syntax error, an unknown table,
    /// column or function.
    #[error("SQL: {0}")]
    Query(String),
    /// An `abridge sql` query would send more inputs to models than `--max-model-rows`.
    #[error(
        "the query would call a model on {rows} inputs, more than --max-model-rows {max}: \
         narrow it (WHERE, LIMIT) or raise the limit"
    )]
    TooManyModelRows {
        /// Distinct inputs not in the cache.
        rows: usize,
        /// The limit.
        max: usize,
    },
    /// A flag's value is malformed or names nothing usable (`--table`, `--format`/`--out`).
    #[error("{0}")]
    Usage(String),
    /// A query's input file cannot be read to its end (a corrupt data page).
    #[error(transparent)]
    UnreadableFile(Box<OperatorError>),
    /// DataFusion failed planning or running a query.
    #[error(transparent)]
    DataFusion(Box<DataFusionError>),
    /// Formatting or writing query results failed.
    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),
    /// Writing Parquet failed.
    #[error(transparent)]
    Parquet(#[from] parquet::errors::ParquetError),
}

impl From<DataFusionError> for PipelineError {
    fn from(err: DataFusionError) -> Self {
        PipelineError::DataFusion(Box::new(err))
    }
}

/// Signal numbers as POSIX fixes them (the same on every Unix abridge runs on).
pub const SIGINT: i32 = 2;
/// See [`SIGINT`].
pub const SIGTERM: i32 = 15;

fn signal_name(signal: Option<i32>) -> String {
    match signal {
        Some(SIGINT) => "SIGINT".into(),
        Some(SIGTERM) => "SIGTERM".into(),
        Some(n) => format!("signal {n}"),
        None => "a stop request".into(),
    }
}

fn interrupted_message(signal: Option<i32>, run: Option<&(String, PathBuf)>) -> String {
    match run {
        Some((run_id, run_dir)) => format!(
            "run {run_id} interrupted by {} (what it committed is kept in {}; run the job \
             again to continue it)",
            signal_name(signal),
            run_dir.display()
        ),
        None => format!(
            "interrupted by {} before the run began writing",
            signal_name(signal)
        ),
    }
}

/// The exit code of a run that another live run's lock refused: `EX_TEMPFAIL`
/// (sysexits.h), "try again later", which schedulers and `systemd` know.
pub const EXIT_LOCKED: u8 = 75;

impl PipelineError {
    /// What a scheduler needs to tell apart: 1 the job failed on its data or environment,
    /// 2 what the user must fix in how abridge was called (flags, job file, SQL), 3 a run
    /// that committed without some unreadable input files, 75 another live run holds the
    /// output or took it over (retry later), 128 + the signal's number (130 SIGINT, 143 SIGTERM) a run
    /// stopped by a signal (resumable).
    pub fn exit_code(&self) -> u8 {
        match self {
            PipelineError::Locked { .. } | PipelineError::LockLost { .. } => EXIT_LOCKED,
            PipelineError::Index(err)
                if matches!(**err, abridge_operators::index::IndexError::Locked { .. }) =>
            {
                EXIT_LOCKED
            }
            PipelineError::Interrupted { signal, .. } => {
                128 + signal.unwrap_or(SIGINT).clamp(1, 127) as u8
            }
            PipelineError::QueryInterrupted { signal } => 128 + (*signal).clamp(1, 127) as u8,
            PipelineError::InputFilesSkipped { .. } => 3,
            // An index of another encoder or layout: the job must name another index.
            PipelineError::Index(err)
                if matches!(
                    **err,
                    abridge_operators::index::IndexError::Incompatible { .. }
                ) =>
            {
                2
            }
            PipelineError::Job(_)
            | PipelineError::JobDoesNotFitInput { .. }
            | PipelineError::Model { .. }
            | PipelineError::ReadOnly(_)
            | PipelineError::Query(_)
            | PipelineError::TooManyModelRows { .. }
            | PipelineError::Usage(_) => 2,
            _ => 1,
        }
    }
}

/// An encoder's error while running `job` (or searching an index: the encoder's folder).
pub(crate) fn encoder_error(job: &Path, source: EncoderError) -> PipelineError {
    PipelineError::Model {
        job: job.to_path_buf(),
        source: Box::new(OperatorError::Encoder(Box::new(source))),
    }
}
