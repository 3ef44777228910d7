//! abridge's pipeline stages, one module each (DESIGN.md): every stage is an [`Operator`]
//! that turns a stream of Arrow `RecordBatch`es into another.
//!
//! Data enters through [`scan::ParquetScan`] (DataFusion reading the user's Parquet) and
//! leaves through [`sink::ParquetSink`] (the run's output files). Operators know nothing of
//! job files or the CLI; beside each stage, its job-file section's config implements the
//! stage contract ([`stage`]) that builds it, and the pipeline crate keeps the table of
//! those sections, wires the operators with bounded channels and reads their
//! [`StageCounters`]. The models the stages call (encoders, generators) are
//! abridge-models'.

mod compaction;
mod counters;
pub mod dedup;
pub mod embed;
mod error;
pub mod extract;
pub mod filter;
pub mod index;
pub mod normalize;
mod operator;
pub mod quality;
pub mod scan;
pub mod scope;
pub mod sink;
pub mod stage;
pub mod stop;
pub mod summarize;
pub mod tasks;
pub mod template;

pub use counters::{CountersSnapshot, StageCounters};
pub use error::OperatorError;
pub use operator::{
    AsyncBatchTransform, AsyncTransformStage, BatchTransform, Operator, TransformStage, map_batches,
};

/// DataFusion's stream of record batches: what every operator consumes and produces.
pub use datafusion::execution::SendableRecordBatchStream;
