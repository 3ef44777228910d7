use std::path::PathBuf;

use abridge_schemas::SchemaError;
use arrow::error::ArrowError;
use datafusion::error::DataFusionError;
use parquet::errors::ParquetError;

/// Errors of building or running an operator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OperatorError {
    /// The input's columns do not fit the job's column mapping.
    #[error(transparent)]
    Schema(#[from] SchemaError),
    /// The input path names nothing readable.
    #[error("input {path}: {reason}")]
    InputNotFound {
        /// The path, folder or glob as given.
        path: String,
        /// What was wrong with it.
        reason: String,
    },
    /// A file that should be Parquet cannot be read as Parquet (truncated, corrupt, other format).
    #[error("{}: not a readable Parquet file: {source}", path.display())]
    CorruptParquet {
        /// The file.
        path: PathBuf,
        /// What the Parquet reader said.
        source: ParquetError,
    },
    /// The input files' schemas cannot be read or merged.
    #[error("input {path}: {source}")]
    InputSchema {
        /// The path, folder or glob as given.
        path: String,
        /// What DataFusion said.
        source: DataFusionError,
    },
    /// The job's `input.where` clause does not parse or does not fit the input's columns.
    #[error("input.where `{clause}`: {source}")]
    Where {
        /// The clause as written.
        clause: String,
        /// What DataFusion said.
        source: DataFusionError,
    },
    /// A model file could not be read for the digest that keys reuse of its answers.
    #[error(transparent)]
    ModelFingerprint(#[from] abridge_models::fingerprint::FingerprintError),
    /// A filesystem operation on an output file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// Writing an output file failed (disk full, I/O error).
    #[error("{}: cannot write: {source}", path.display())]
    WriteFailed {
        /// The file being written.
        path: PathBuf,
        /// What the Parquet writer said.
        source: ParquetError,
    },
    /// Reading an input file failed part-way (corrupt pages, I/O error).
    #[error("{}: {source}", path.display())]
    ReadFailed {
        /// The file.
        path: PathBuf,
        /// What DataFusion said.
        source: DataFusionError,
    },
    /// An `embed.input` (or other) template is malformed or names a missing column.
    #[error("template `{template}`: {reason}")]
    Template {
        /// The template as written.
        template: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A stage's configuration cannot be used: `key` is its dotted key in the job file.
    #[error("key `{key}`: {message}")]
    Config {
        /// The dotted key (`summarize.device`).
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// The sentence encoder failed to load or run.
    #[error(transparent)]
    Encoder(Box<abridge_models::encoder::EncoderError>),

    /// The summarizer's model failed to load.
    #[error(transparent)]
    Generator(Box<abridge_models::generator::GeneratorError>),
    /// A post-processing rule's pattern is not a regular expression.
    #[error("rule `{pattern}`: not a valid regular expression: {reason}")]
    Rule {
        /// The pattern as written.
        pattern: String,
        /// What the regex parser said.
        reason: String,
    },
    /// A stage was wired after stages that do not produce the columns it needs.
    #[error("{0}")]
    StageSchema(String),
    /// Something the sink keeps in step with its files (the run's index) could not take a
    /// published file. Boxed as any error, so that this type depends on no one stage's.
    #[error("{source}")]
    Observer {
        /// What failed, for logs and tests ("index").
        observer: &'static str,
        /// Its error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An Arrow compute kernel failed.
    #[error(transparent)]
    Arrow(#[from] ArrowError),
    /// Writing Parquet failed.
    #[error(transparent)]
    Parquet(#[from] ParquetError),
    /// DataFusion failed while planning or running a scan.
    #[error(transparent)]
    DataFusion(DataFusionError),
    /// A stage's worker thread went away without an answer (it panicked or was cancelled).
    #[error("{0} worker stopped unexpectedly")]
    WorkerGone(&'static str),
    /// The run was told to stop at once; what was published before stays.
    #[error("stopped at once: the file being written was abandoned")]
    Stopped,
}

impl OperatorError {
    /// A [`OperatorError::Config`] error of `key`.
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        OperatorError::Config {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Operator errors travel through DataFusion streams wrapped as `External`; unwrap them on
/// the way out so that callers see the original, file-naming error.
impl From<DataFusionError> for OperatorError {
    fn from(err: DataFusionError) -> Self {
        match err {
            DataFusionError::External(inner) => match inner.downcast::<OperatorError>() {
                Ok(op) => *op,
                Err(other) => OperatorError::DataFusion(DataFusionError::External(other)),
            },
            other => OperatorError::DataFusion(other),
        }
    }
}

impl From<OperatorError> for DataFusionError {
    fn from(err: OperatorError) -> Self {
        match err {
            OperatorError::DataFusion(inner) => inner,
            other => DataFusionError::External(Box::new(other)),
        }
    }
}
