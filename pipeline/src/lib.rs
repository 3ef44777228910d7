//! abridge's pipeline: job files, the streaming executor, and what the `abridge` CLI runs.
//!
//! A [`job::Job`] (TOML file plus `--set` overrides) is prepared into an
//! [`executor::PreparedRun`]: the input is resolved and checked and every stage is built
//! before anything is written. Executing it streams the input's record batches through
//! the stages of `abridge-operators` into a new run folder of the output table, by the
//! protocol in [`table`]. Each stage is built from its own section's config (which lives
//! beside the stage, in abridge-operators) by [`executor::prepare`]'s loop over
//! [`job::JobConfig::stages`]. [`sql`] queries the tables, [`search`] a job's index;
//! [`sample`] makes synthetic input.

pub mod error;
pub mod eval;
pub mod executor;
pub mod job;
pub mod progress;
pub mod report;
pub mod sample;
pub mod search;
pub mod sql;
pub mod status;
pub mod table;

pub use error::PipelineError;
