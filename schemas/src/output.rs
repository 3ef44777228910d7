//! The columns abridge adds to the ticket columns in its output table.

use arrow::datatypes::{DataType, Field};

/// Version of the output table's layout, written into every file's metadata under
/// [`SCHEMA_VERSION_KEY`] so that later tools can read older runs correctly.
pub const SCHEMA_VERSION: &str = "1";
/// Parquet/Arrow metadata key holding [`SCHEMA_VERSION`].
pub const SCHEMA_VERSION_KEY: &str = "abridge.schema_version";

/// The run that produced a row (also the name of the run's partition folder).
pub const RUN_ID: &str = "run_id";
/// Hex digest of the ticket's content (title and text); what incremental runs compare.
pub const CONTENT_HASH: &str = "content_hash";
/// Why a row could not be processed; null for rows that went through.
pub const ERROR: &str = "error";

/// The columns the table itself writes in every row: an input column of one of these
/// names cannot be carried through unchanged. The stages' own columns are theirs to list
/// (abridge-operators' `StageSection::COLUMNS`).
pub const RESERVED: &[&str] = &[RUN_ID, CONTENT_HASH, ERROR];

/// The `run_id` field.
pub fn run_id_field() -> Field {
    Field::new(RUN_ID, DataType::Utf8, false)
}

/// The `content_hash` field.
pub fn content_hash_field() -> Field {
    Field::new(CONTENT_HASH, DataType::Utf8, true)
}

/// The `error` field.
pub fn error_field() -> Field {
    Field::new(ERROR, DataType::Utf8, true)
}
